"""Peak memory and time of the generator's loss over a large vocabulary: chunked against naive cross-entropy.

    python benchmarks/bench_generator_loss.py [--batch 8] [--length 256] [--dim 768] [--codebook-size 262144]
                                              [--chunk-mb 256] [--repeats 2] [--quick]

One forward + backward of the mean next-code cross-entropy of N = batch x length positions (hidden states
(N, dim), the head weight (K, dim), both fp32 and requiring grad; defaults: 8 x 256 = 2,048 positions,
dim 768 as GPT-B, K = 262,144) in two ways:

- chunked: `stage2_generator.loss.chunked_cross_entropy` with `chunk_rows(K, 256 MiB)` rows per chunk, as
  `OutputHead` calls it: at most chunk_rows x K logits exist at once, forward or backward;
- naive: `F.cross_entropy(hidden @ W.T, targets)`: the N x K logits and their log-softmax are kept for the
  backward, so it holds at least 2 x N x K x 4 bytes (4 GiB at 2,048 positions).

Each variant runs in a fresh worker process (`--worker VARIANT`) so that one peak cannot hide the other.
Peak memory = the RSS high-water mark during the forward + backward calls minus the RSS just before them
(after the inputs are built), set against what each is expected to hold: the naive backward holds the
log-softmax, its gradient and the logits' gradient at once (3 x N x K x 4 bytes); the chunked loss the
weight's gradient (K x dim x 4 bytes) and two chunk-sized buffers.
Time = median of `--repeats` forward + backward calls. Each worker saves its loss and gradients; the
driver reports the largest absolute differences between the two and fails if they disagree beyond fp32
rounding. Writes benchmarks/results/generator_loss.json and the generator_loss section of
docs/BENCHMARKS.md; `--quick` (4 x 256 positions, one repeat) prints only and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (MIB, REPO, cpu_times, markdown_table, other_cpu_share, proc_status_kib,  # noqa: E402
                               provenance, publish, reset_peak_rss)
from stage2_generator.loss import DEFAULT_CHUNK_MB, chunk_rows, chunked_cross_entropy  # noqa: E402

VARIANTS = ("chunked", "naive")
GIB = 2**30
# the framing: the fp32 logits of one 32 x 256 batch at K = 262,144
FRAMING_BATCH, FRAMING_LENGTH, FRAMING_K = 32, 256, 262144
# agreement: the chunked backward recomputes the logits, so expect fp32 rounding differences only
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-4, 1e-6


# ----------------------------------------------------------------------------------------- worker

def inputs(rows: int, dim: int, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same hidden states, head weight and targets in every worker (fixed seeds)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(codebook_size, dim, generator=g) * dim**-0.5  # logits of order 1, as a trained head
    targets = torch.randint(0, codebook_size, (rows,), generator=g)
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


def worker(variant: str, rows: int, dim: int, codebook_size: int, chunk_mb: float, repeats: int,
           save_to: str) -> dict:
    torch.set_num_threads(os.cpu_count())
    hidden, weight, targets = inputs(rows, dim, codebook_size)
    per_chunk = chunk_rows(codebook_size, chunk_mb)

    def loss_fn() -> torch.Tensor:
        if variant == "chunked":
            return chunked_cross_entropy(hidden, weight, targets, per_chunk)
        return F.cross_entropy(hidden @ weight.T, targets)

    baseline_kib = proc_status_kib("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None  # each call allocates its gradients, as the first training step does
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - start)
    peak_kib = proc_status_kib("VmHWM")
    torch.save({"loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}, save_to)
    return {"variant": variant, "rows": rows, "dim": dim, "codebook_size": codebook_size,
            "chunk_rows": per_chunk if variant == "chunked" else None, "threads": torch.get_num_threads(),
            "times_s": times, "loss": float(loss.detach()), "baseline_rss_bytes": baseline_kib * 1024,
            "peak_rss_bytes": peak_kib * 1024, "peak_increase_bytes": (peak_kib - baseline_kib) * 1024}


# ------------------------------------------------------------------------------------- driver side

def run_worker(variant: str, args, rows: int, repeats: int, save_to: Path) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--rows", str(rows), "--dim", str(args.dim),
               "--codebook-size", str(args.codebook_size), "--chunk-mb", str(args.chunk_mb),
               "--repeats", str(repeats), "--save-to", str(save_to)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    result = json.loads(done.stdout.splitlines()[-1])
    result["median_s"] = statistics.median(result["times_s"])
    result["positions_per_s"] = rows / result["median_s"]
    return result


def agreement(chunked: Path, naive: Path) -> dict:
    a, b = torch.load(chunked), torch.load(naive)
    diffs = {name: float((a[name] - b[name]).abs().max()) for name in ("loss", "grad_hidden", "grad_weight")}
    scales = {name: float(b[name].abs().max()) for name in ("grad_hidden", "grad_weight")}
    passed = (diffs["loss"] <= LOSS_TOLERANCE and diffs["grad_hidden"] <= GRAD_TOLERANCE
              and diffs["grad_weight"] <= GRAD_TOLERANCE)
    return {"max_abs_diff": diffs, "naive_max_abs": scales, "tolerance": {"loss": LOSS_TOLERANCE,
                                                                          "grad": GRAD_TOLERANCE},
            "passed": passed}


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:,.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="positions per sequence (16 x 16 codes)")
    parser.add_argument("--dim", type=int, default=768, help="hidden width (768 = GPT-B)")
    parser.add_argument("--codebook-size", type=int, default=262144)
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_MB, help="the chunked loss's logits budget")
    parser.add_argument("--repeats", type=int, help="forward + backward calls per variant (default 2, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="4 x 256 positions, one repeat, print only, write nothing")
    parser.add_argument("--worker", choices=VARIANTS, help="internal: measure one variant in this process")
    parser.add_argument("--rows", type=int, help="internal: positions for --worker")
    parser.add_argument("--save-to", help="internal: where --worker saves its loss and gradients")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)

    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.dim, args.codebook_size, args.chunk_mb, repeats,
                                args.save_to)))
        return

    console = Console()
    batch = 4 if args.quick else args.batch
    rows, k, dim = batch * args.length, args.codebook_size, args.dim
    logits_bytes = rows * k * 4
    load_start = cpu_times()
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        saved = {variant: Path(tmp) / f"{variant}.pt" for variant in VARIANTS}
        for variant in VARIANTS:
            console.log(f"{variant}: {rows:,} positions x K = {k:,}, dim {dim} ...")
            measured[variant] = run_worker(variant, args, rows, repeats, saved[variant])
        other = other_cpu_share(load_start)
        agree = agreement(saved["chunked"], saved["naive"])
    chunked, naive = measured["chunked"], measured["naive"]
    grad_weight_bytes = k * dim * 4
    chunk_logits_bytes = chunk_rows(k, args.chunk_mb) * k * 4
    ratios = {"memory_naive_over_chunked": naive["peak_increase_bytes"] / chunked["peak_increase_bytes"],
              "time_chunked_over_naive": chunked["median_s"] / naive["median_s"]}
    results = {
        "provenance": provenance("bench_generator_loss.py", sys.argv[1:], "stage2_generator/loss.py"),
        "settings": {"batch": batch, "length": args.length, "rows": rows, "dim": dim, "codebook_size": k,
                     "chunk_mb": args.chunk_mb, "chunk_rows": chunk_rows(k, args.chunk_mb), "repeats": repeats,
                     "dtype": "float32", "quick": args.quick},
        "expected": {"logits_bytes": logits_bytes, "naive_min_bytes": 2 * logits_bytes,
                     "naive_backward_bytes": 3 * logits_bytes,
                     "chunk_logits_bytes": chunk_logits_bytes,
                     "grad_weight_bytes": grad_weight_bytes,
                     "chunked_bytes": grad_weight_bytes + 2 * chunk_logits_bytes,
                     "framing_logits_bytes": FRAMING_BATCH * FRAMING_LENGTH * FRAMING_K * 4},
        "results": measured,
        "ratios": ratios,
        "agreement": agree,
        "other_cpu_share": other,
    }
    expected = {"chunked": grad_weight_bytes + 2 * chunk_logits_bytes, "naive": 3 * logits_bytes}
    header = ["loss", "peak increase GiB", "expected GiB", "peak / (N x K x 4 B)", "peak RSS GiB", "time s",
              "positions/s"]
    rows_table = [[name, gib(m["peak_increase_bytes"]), gib(expected[name]),
                   f"{m['peak_increase_bytes'] / logits_bytes:.2f}", gib(m["peak_rss_bytes"]),
                   f"{m['median_s']:.2f}", f"{m['positions_per_s']:,.0f}"] for name, m in measured.items()]
    d = agree["max_abs_diff"]
    console.print(markdown_table(header, rows_table))
    console.print(f"naive / chunked peak: {ratios['memory_naive_over_chunked']:.1f}x; chunked / naive time: "
                  f"{ratios['time_chunked_over_naive']:.2f}x; expected naive >= 2 x N x K x 4 = "
                  f"{gib(2 * logits_bytes)} GiB (3 x N x K x 4 = {gib(3 * logits_bytes)} GiB in the backward)")
    console.print(f"agreement: loss {chunked['loss']:.6f} vs {naive['loss']:.6f}, max |diff| loss {d['loss']:.2e}, "
                  f"grad hidden {d['grad_hidden']:.2e}, grad weight {d['grad_weight']:.2e}: "
                  f"{'pass' if agree['passed'] else 'FAIL'}; other processes used {other:.0%} of the machine's CPU")
    if not agree["passed"]:
        raise SystemExit("chunked and naive losses or gradients disagree beyond the tolerance")
    if args.quick:
        return
    p, s, e = results["provenance"], results["settings"], results["expected"]
    section = f"""## Generator loss over K = {k:,}: chunked vs naive cross-entropy (`stage2_generator.loss`)

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
torch {p['torch']}). Raw numbers: `benchmarks/results/generator_loss.json`.

The problem: the fp32 logits of a {FRAMING_BATCH} x {FRAMING_LENGTH} batch at K = {FRAMING_K:,} are
{e['framing_logits_bytes'] / 1e9:.1f} GB, and a plain `F.cross_entropy(logits, targets)` keeps them and their
log-softmax for the backward. Here one forward + backward of the mean cross-entropy of N = {s['batch']} x
{s['length']} = {s['rows']:,} positions (hidden (N, {dim}) as GPT-B, head weight (K, {dim}), fp32, both requiring
grad) with `chunked_cross_entropy` ({s['chunk_mb']:.0f} MiB of logits per chunk = {s['chunk_rows']} rows) and with
`F.cross_entropy(hidden @ W.T, targets)`, each in a fresh process. Peak increase = RSS high-water mark during
the calls minus RSS before them. The naive loss must hold at least 2 x N x K x 4 bytes =
{gib(e['naive_min_bytes'])} GiB (the logits and their log-softmax, kept for the backward); expected is
3 x N x K x 4 = {gib(e['naive_backward_bytes'])} GiB, as its backward holds the log-softmax, its gradient and the
logits' gradient at once. The chunked loss is expected to hold the weight's gradient (K x {dim} x 4 =
{gib(grad_weight_bytes)} GiB, which the naive loss allocates only after its peak) and two chunk-sized buffers
(2 x {e['chunk_logits_bytes'] / MIB:.0f} MiB: the chunk's logits and one temporary), whatever N is. Time is the
median of {s['repeats']} call(s). Other processes used {other:.0%} of the machine's CPU time during the run.

{markdown_table(header, rows_table)}

Naive / chunked peak memory: **{ratios['memory_naive_over_chunked']:.1f}x**; chunked / naive time:
{ratios['time_chunked_over_naive']:.2f}x (the chunked backward recomputes each chunk's logits: one more
N x K x dim GEMM than the naive three). The two agree: loss {chunked['loss']:.6f} vs {naive['loss']:.6f}, largest
absolute differences loss {d['loss']:.1e}, hidden-state gradient {d['grad_hidden']:.1e}, weight gradient
{d['grad_weight']:.1e} (largest naive gradient entries {agree['naive_max_abs']['grad_hidden']:.1e} and
{agree['naive_max_abs']['grad_weight']:.1e}).
"""
    publish("generator_loss", results, section)


if __name__ == "__main__":
    main()
