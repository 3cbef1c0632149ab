"""Benchmark: forward throughput and peak memory of our SimVQ quantizer against vector-quantize-pytorch's.

For each (codebook size K, code dim) case, one forward of `stage1_tokenizer.quantizers.SimVQ` ("ours")
and of `vector_quantize_pytorch.SimVQ` ("ref", rotation trick off) on the same 4,096 latent vectors,
laid out as (16, dim, 16, 16) as an encoder produces them; both in train mode with `requires_grad` on
the input as in training, forward only (no backward). It reports

- tokens/s: 4,096 / the median time of `--repeats` calls after one warm-up call;
- effective GFLOP/s: 2 * tokens * K * dim (the search's multiply-adds) / that time, set against the
  machine's fp32 GEMM rate (torch.mm at 2048^3), measured at the start and at the end of the same run;
- peak memory: what the forward calls add to the process's resident memory (peak RSS during them
  minus RSS just before them), and the peak RSS itself;
- a sweep of our search's memory budget (`search_max_bytes`) at K = 65,536, dim 128;
- the reference again on the same tokens as one (1, 4,096, dim) sequence ("ref_flat"): its
  torch.cdist broadcasts the codebook over the batch, so the batch layout costs it time and memory.

Every (implementation, case) runs in a fresh worker process (`--worker IMPL K DIM`), so that one
measurement's memory cannot leak into the next. Results go to benchmarks/results/quantizer.json and
to the quantizer section of docs/BENCHMARKS.md, between the markers below.

    python benchmarks/bench_quantizer.py              # full run, a few minutes on 2 cores
    python benchmarks/bench_quantizer.py --quick      # smoke run: 2 repeats, prints only, writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (GEMM_SIZE, MIB, REPO, cpu_times, gemm_rate, markdown_table,  # noqa: E402
                               other_cpu_share, proc_status_kib, provenance, publish, reset_peak_rss)
from stage1_tokenizer.quantizers.search import DEFAULT_MAX_BYTES  # noqa: E402

IMPLS = ("ours", "ref", "ref_flat")
CASES = [(1024, 128), (65536, 128), (262144, 8), (262144, 128)]  # (K, dim)
BATCH, SIDE = 16, 16
TOKENS = BATCH * SIDE * SIDE  # 4,096 tokens per call
SWEEP_CASE = (65536, 128)
SWEEP_MIB = [2, 8, 32, 128]
DEFAULT_SEARCH_MIB = DEFAULT_MAX_BYTES // MIB
DEFAULT_REPEATS, QUICK_REPEATS = 5, 2

# Targets: at K >= BIG_K ours must be MIN_SPEEDUP times faster and need at most 1/MIN_MEMORY_RATIO of
# the reference's memory; at dim 128 its search must run at MIN_GEMM_FRACTION of the GEMM rate.
BIG_K = 65536
MIN_SPEEDUP = 3.0
MIN_MEMORY_RATIO = 4.0
GEMM_TARGET_DIM = 128
MIN_GEMM_FRACTION = 0.5


# ----------------------------------------------------------------------------------------- worker

def build(impl: str, codebook_size: int, dim: int, search_max_bytes: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)  # the reference draws its frozen codebook from the global generator
    z = torch.randn(BATCH, dim, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    if impl == "ours":
        from stage1_tokenizer.quantizers import SimVQ
        module = SimVQ(codebook_size, dim, search_max_bytes=search_max_bytes)
    elif impl == "ref":
        from vector_quantize_pytorch import SimVQ as RefSimVQ
        # channel_first: it takes the same (B, dim, h, w) latents as ours and flattens them itself
        module = RefSimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=False, channel_first=True)
    else:  # ref_flat: the same tokens, in the same order, as a single (1, tokens, dim) sequence
        from vector_quantize_pytorch import SimVQ as RefSimVQ
        module = RefSimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=False)
        z = z.permute(0, 2, 3, 1).reshape(1, TOKENS, dim).contiguous()
    return module.train(), z.requires_grad_(True)


def worker(impl: str, codebook_size: int, dim: int, search_max_bytes: int, repeats: int) -> dict:
    torch.set_num_threads(os.cpu_count())
    module, z = build(impl, codebook_size, dim, search_max_bytes)
    baseline_kib = proc_status_kib("VmRSS")
    reset_peak_rss()
    module(z)  # warm-up; its memory counts too (the peak covers every call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(z)
        times.append(time.perf_counter() - start)
    peak_kib = proc_status_kib("VmHWM")
    return {
        "impl": impl,
        "codebook_size": codebook_size,
        "dim": dim,
        "search_max_bytes": search_max_bytes if impl == "ours" else None,
        "threads": torch.get_num_threads(),
        "times_s": times,
        "baseline_rss_bytes": baseline_kib * 1024,
        "peak_rss_bytes": peak_kib * 1024,
    }


# ------------------------------------------------------------------------------------- driver side

def run_worker(impl: str, codebook_size: int, dim: int, repeats: int, search_mib: int = DEFAULT_SEARCH_MIB) -> dict:
    command = [sys.executable, __file__, "--worker", impl, str(codebook_size), str(dim),
               "--repeats", str(repeats), "--search-mib", str(search_mib)]
    # stdout carries the result; stderr stays on the terminal so that a failing worker is visible
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    result = json.loads(done.stdout.splitlines()[-1])
    median = statistics.median(result["times_s"])
    result["median_s"] = median
    result["tokens_per_s"] = TOKENS / median
    result["gflops"] = 2 * TOKENS * codebook_size * dim / median / 1e9
    result["peak_increase_bytes"] = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    return result


def compare(codebook_size: int, ours: dict, ref: dict) -> dict:
    """Ours against one reference measurement, with the targets that apply at this K."""
    speedup = ours["tokens_per_s"] / ref["tokens_per_s"]
    memory_ratio = ref["peak_increase_bytes"] / ours["peak_increase_bytes"]
    targets = {}
    if codebook_size >= BIG_K:
        targets["speed-up"] = speedup >= MIN_SPEEDUP
        targets["memory"] = memory_ratio >= MIN_MEMORY_RATIO
    return {"speedup": speedup, "memory_ratio": memory_ratio, "targets": targets}


def judge(codebook_size: int, dim: int, pair: dict, gemm_gflops: float) -> dict:
    """Everything derived for one case: the comparisons with both reference layouts, the GEMM fraction,
    and the targets against the main reference (`ref`) plus, at dim 128, the GEMM-rate target."""
    ours = pair["ours"]
    main = compare(codebook_size, ours, pair["ref"])
    gemm_fraction = ours["gflops"] / gemm_gflops
    if dim == GEMM_TARGET_DIM:
        main["targets"]["GEMM rate"] = gemm_fraction >= MIN_GEMM_FRACTION
    return {"codebook_size": codebook_size, "dim": dim, **pair, **main, "gemm_fraction": gemm_fraction,
            "passed": all(main["targets"].values()),
            "against_ref_flat": compare(codebook_size, ours, pair["ref_flat"])}


def verdict(targets: dict) -> str:
    failed = [name for name, ok in targets.items() if not ok]
    return "FAIL: " + ", ".join(failed) if failed else "pass"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:,.1f}"


def main_rows(results: dict) -> list[list[str]]:
    rows = []
    for case in results["cases"]:
        ours, ref = case["ours"], case["ref"]
        rows.append([
            f"{case['codebook_size']:,}", str(case["dim"]),
            f"{ours['tokens_per_s']:,.0f}", f"{ref['tokens_per_s']:,.0f}", f"{case['speedup']:.1f}x",
            f"{ours['gflops']:.1f}", f"{100 * case['gemm_fraction']:.0f}%",
            mib(ours["peak_increase_bytes"]), mib(ref["peak_increase_bytes"]), f"{case['memory_ratio']:.1f}x",
            mib(ours["peak_rss_bytes"]), mib(ref["peak_rss_bytes"]),
            verdict(case["targets"]),
        ])
    return rows


MAIN_HEADER = ["K", "dim", "ours tokens/s", "ref tokens/s", "speed-up", "ours GFLOP/s", "% of GEMM",
               "ours peak MiB", "ref peak MiB", "memory ratio", "ours peak RSS MiB", "ref peak RSS MiB", "targets"]
FLAT_HEADER = ["K", "dim", "ref tokens/s", "ref_flat tokens/s", "speed-up over ref_flat", "ref peak MiB",
               "ref_flat peak MiB", "memory ratio (ref_flat/ours)", "targets against ref_flat"]
SWEEP_HEADER = ["search_max_bytes", "tokens/s", "GFLOP/s", "peak MiB"]


def flat_rows(results: dict) -> list[list[str]]:
    rows = []
    for case in results["cases"]:
        ref, flat, against = case["ref"], case["ref_flat"], case["against_ref_flat"]
        rows.append([
            f"{case['codebook_size']:,}", str(case["dim"]),
            f"{ref['tokens_per_s']:,.0f}", f"{flat['tokens_per_s']:,.0f}", f"{against['speedup']:.1f}x",
            mib(ref["peak_increase_bytes"]), mib(flat["peak_increase_bytes"]), f"{against['memory_ratio']:.1f}x",
            verdict(against["targets"]),
        ])
    return rows


def sweep_rows(results: dict) -> list[list[str]]:
    return [[f"{r['search_max_bytes'] // MIB} MiB", f"{r['tokens_per_s']:,.0f}", f"{r['gflops']:.1f}",
             mib(r["peak_increase_bytes"])] for r in results["search_budget_sweep"]]


def print_tables(console: Console, results: dict) -> None:
    gemm = results["gemm"]
    table = Table(title=f"SimVQ forward, {TOKENS:,} tokens/call; GEMM {gemm['start']['gflops']:.1f} (start) / "
                        f"{gemm['end']['gflops']:.1f} (end) GFLOP/s")
    for i, name in enumerate(MAIN_HEADER):
        table.add_column(name, justify="left" if i == len(MAIN_HEADER) - 1 else "right")
    for row in main_rows(results):
        table.add_row(*row, style=None if row[-1] == "pass" else "red")
    console.print(table)
    flat = Table(title="The reference on (16, dim, 16, 16) latents (ref) and on one (1, 4,096, dim) sequence (ref_flat)")
    for i, name in enumerate(FLAT_HEADER):
        flat.add_column(name, justify="left" if i == len(FLAT_HEADER) - 1 else "right")
    for row in flat_rows(results):
        flat.add_row(*row, style=None if row[-1] == "pass" else "red")
    console.print(flat)
    sweep = Table(title=f"Ours, search memory budget sweep at K = {SWEEP_CASE[0]:,}, dim {SWEEP_CASE[1]}")
    for name in SWEEP_HEADER:
        sweep.add_column(name, justify="right")
    for row in sweep_rows(results):
        sweep.add_row(*row)
    console.print(sweep)


def markdown_section(results: dict) -> str:
    p, s, gemm = results["provenance"], results["settings"], results["gemm"]
    return f"""## SimVQ quantizer: forward throughput and peak memory

Command: `{p['command'].strip()}`; raw numbers in `benchmarks/results/quantizer.json`.
Machine: {p['cpu_model']}, {p['cpu_count']} CPUs ({s['threads']} torch threads), torch {p['torch']},
vector-quantize-pytorch {p['vector-quantize-pytorch']}; revision {p['git_revision']}, {p['date']}; other processes
used {100 * p['other_cpu_share']:.0f}% of the machine's CPU time during the run.

One forward of ours (`stage1_tokenizer.quantizers.SimVQ`, default `search_max_bytes` = {DEFAULT_SEARCH_MIB} MiB) and of
the reference (`vector_quantize_pytorch.SimVQ`, `rotation_trick=False`, `channel_first=True`) on the same
({BATCH}, dim, {SIDE}, {SIDE}) latents, {TOKENS:,} tokens: train mode, `requires_grad` on the input, forward only.
Time is the median of {s['repeats']} calls after one warm-up call, each (implementation, case) in a fresh process.
GFLOP/s = 2 x tokens x K x dim / time: the search's work over the whole forward's time. The fp32 GEMM rate
(torch.mm, {GEMM_SIZE}^3) was {gemm['start']['gflops']:.1f} GFLOP/s at the start of the run and
{gemm['end']['gflops']:.1f} at the end; "% of GEMM" uses the higher. Peak MiB is the peak RSS during the forward
calls minus the RSS just before them, after building the module and input: the memory the forward needs.
Memory ratio = ref peak MiB / ours peak MiB. Peak RSS is the process's absolute peak, torch included.

{markdown_table(MAIN_HEADER, main_rows(results))}

Targets: at K >= {BIG_K:,}, speed-up >= {MIN_SPEEDUP:.0f}x and ours needs <= 1/{MIN_MEMORY_RATIO:.0f} of the
reference's peak memory (memory ratio >= {MIN_MEMORY_RATIO:.0f}x); at dim {GEMM_TARGET_DIM}, ours runs at
>= {100 * MIN_GEMM_FRACTION:.0f}% of the GEMM rate.

The reference's cost depends on the layout it is given: on (B, N, dim) input its `torch.cdist` broadcasts
the (K, dim) codebook to (B, K, dim), copies it, and writes B x N x K distances. Above it is given the
latents as an encoder produces them, (16, dim, 16, 16) with `channel_first=True` (as in its own example);
here it is also given the same tokens as one (1, {TOKENS:,}, dim) sequence (`ref_flat`), and the targets are
checked against that too:

{markdown_table(FLAT_HEADER, flat_rows(results))}

Our search's memory budget at K = {SWEEP_CASE[0]:,}, dim {SWEEP_CASE[1]} (the distance block size; the default is
{DEFAULT_SEARCH_MIB} MiB):

{markdown_table(SWEEP_HEADER, sweep_rows(results))}"""


def run_benchmark(argv: list[str], repeats: int, write: bool) -> None:
    console = Console()
    if not console.is_terminal:  # piped to a log: do not squeeze the 13-column table into 80 columns
        console = Console(width=200)
    torch.set_num_threads(os.cpu_count())
    results = {"provenance": provenance("bench_quantizer.py", argv, "stage1_tokenizer/quantizers",
                                        ("vector-quantize-pytorch",)),
               "settings": {"tokens_per_call": TOKENS, "batch": BATCH, "height": SIDE, "width": SIDE,
                            "repeats": repeats, "threads": torch.get_num_threads(),
                            "mode": "train mode, requires_grad on the input, forward only",
                            "reference_options": {"ref": {"rotation_trick": False, "channel_first": True,
                                                              "input": "(16, dim, 16, 16)"},
                                                      "ref_flat": {"rotation_trick": False, "channel_first": False,
                                                                   "input": "(1, 4096, dim)"}}},
               "targets": {"big_k": BIG_K, "min_speedup": MIN_SPEEDUP, "min_memory_ratio": MIN_MEMORY_RATIO,
                           "gemm_target_dim": GEMM_TARGET_DIM, "min_gemm_fraction": MIN_GEMM_FRACTION}}

    cpu_start = cpu_times()
    gemm_start = gemm_rate()
    console.log(f"GEMM rate at start: {gemm_start['gflops']:.1f} GFLOP/s")
    measured = []
    for codebook_size, dim in CASES:
        pair = {}
        for impl in IMPLS:
            console.log(f"{impl} K={codebook_size:,} dim={dim} ...")
            pair[impl] = run_worker(impl, codebook_size, dim, repeats)
        measured.append((codebook_size, dim, pair))
    sweep = []
    for search_mib in SWEEP_MIB:
        console.log(f"ours K={SWEEP_CASE[0]:,} dim={SWEEP_CASE[1]} search_max_bytes={search_mib} MiB ...")
        sweep.append(run_worker("ours", *SWEEP_CASE, repeats, search_mib=search_mib))
    gemm_end = gemm_rate()
    console.log(f"GEMM rate at end: {gemm_end['gflops']:.1f} GFLOP/s")

    # the higher of the two GEMM rates: the stricter reference for the "% of GEMM" target
    gemm_gflops = max(gemm_start["gflops"], gemm_end["gflops"])
    results["provenance"]["other_cpu_share"] = other_cpu_share(cpu_start)
    console.log(f"other processes used {100 * results['provenance']['other_cpu_share']:.0f}% of the CPU time "
                f"during the run")
    results["gemm"] = {"size": GEMM_SIZE, "start": gemm_start, "end": gemm_end, "reference_gflops": gemm_gflops}
    results["cases"] = [judge(k, d, pair, gemm_gflops) for k, d, pair in measured]
    results["search_budget_sweep"] = sweep

    print_tables(console, results)
    if write:
        publish("quantizer", results, markdown_section(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help=f"timed calls per measurement (default {DEFAULT_REPEATS}, "
                                                    f"{QUICK_REPEATS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats, print only, write nothing")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "K", "DIM"),
                        help="internal: measure one (implementation, case) in this process, print JSON")
    parser.add_argument("--search-mib", type=int, default=DEFAULT_SEARCH_MIB, help="internal: ours' search budget")
    args = parser.parse_args()
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)

    if args.worker:
        impl, codebook_size, dim = args.worker
        if impl not in IMPLS:
            parser.error(f"worker implementation must be one of {IMPLS}, got {impl!r}")
        print(json.dumps(worker(impl, int(codebook_size), int(dim), args.search_mib * MIB, repeats)))
    else:
        run_benchmark(sys.argv[1:], repeats, write=not args.quick)


if __name__ == "__main__":
    main()
