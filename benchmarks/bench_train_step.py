"""One stage-2 training step, ours against a lean plain-PyTorch implementation of the same model.

    python benchmarks/bench_train_step.py [--sizes nano,small,B] [--codebook-size 16384] [--grid 16]
                                          [--batch 4] [--steps 4] [--repeats 2] [--compile [SIZES]]
                                          [--checkpoint-activations] [--quick]

A step is forward + backward + AdamW (betas 0.9 / 0.95, weight decay on matrices, no clipping) on a batch of
random codes and class labels, for (a) ours: `stage2_generator.Generator` (its llama decoder, chunked
loss) and (b) lean: benchmarks/lean_generator.py (fused qkv and SwiGLU projections, SDPA, one
`F.cross_entropy` over materialised logits), with the same size, vocabulary, batch and starting weights (the
lean model is loaded from ours; the parameter counts are asserted equal and the per-step losses compared).
Every (implementation, size, repeat) runs in a fresh process, alternating ours / lean, so neither inherits
the other's allocator or caches; tokens/s = batch x codes x timed steps / their time, after `--warmup` steps.
`--compile` adds both implementations under torch.compile (warm-up then includes compilation), at every size
or at the sizes listed (`--compile nano,small`).

Precision: fp32 on the CPU; bf16 autocast (fp32 weights) on CUDA. Peak memory: on CUDA max_memory_allocated
over the steps (weights, optimizer state and activations); on the CPU the RSS high-water mark during the timed
step above the RSS before it (activations and gradients; weights and the optimizer state exist by then), in one
more process per variant with glibc told to map every allocation >= 128 KiB and unmap it when freed, so that
RSS follows the live tensors (the speed runs keep glibc's defaults: that mapping costs page faults).
MFU = model FLOPs per token (stage2_generator.model.training_flops_per_token: 6 x matmul parameters +
12 x layers x width x positions) x tokens/s over the machine's GEMM rate measured in the same run (fp32
torch.mm 2048^3 on the CPU, bf16 8192^3 on CUDA), before and after the runs: the higher of the two.
Writes benchmarks/results/train_step.json and the train_step section of docs/BENCHMARKS.md;
`--checkpoint-activations` adds ours with `model.checkpoint_activations=true` (its time and memory cost).
`--quick` (size nano, K = 1,024, 8 x 8 grid, 3 steps, 1 repeat) prints only and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (MIB, cpu_times, machine_rate, markdown_table, other_cpu_share,  # noqa: E402
                               parse_quick_args, provenance, publish, run_json_worker, timed_steps)
from benchmarks.lean_generator import LeanGenerator, load_generator_weights  # noqa: E402
from stage2_generator.config import GeneratorConfig  # noqa: E402
from stage2_generator.model import Generator, parameter_groups, training_flops_per_token  # noqa: E402

IMPLEMENTATIONS = ("ours", "lean", "ours_checkpointed")
NUM_CLASSES = 1000
QUICK = {"sizes": "nano", "codebook_size": 1024, "grid": 8, "steps": 3, "repeats": 1}


# ----------------------------------------------------------------------------------------- worker

def model_config(size: str, codebook_size: int, grid: int) -> GeneratorConfig:
    return GeneratorConfig(size=size, conditioning="class", codebook_size=codebook_size, grid=[grid, grid],
                           num_classes=NUM_CLASSES)


def build(implementation: str, cfg: GeneratorConfig, device: torch.device) -> torch.nn.Module:
    """The implementation's model with ours' starting weights (seed 0; our zero head re-drawn at random, so
    that the losses after step 0 say whether both compute the same function)."""
    torch.manual_seed(0)
    ours = Generator(replace(cfg, checkpoint_activations=implementation == "ours_checkpointed"))
    torch.nn.init.normal_(ours.head.weight, std=0.02)
    if implementation != "lean":
        return ours.to(device)
    lean = LeanGenerator(cfg)
    load_generator_weights(lean, ours)
    return lean.to(device)


def worker(args) -> dict:
    """Train `args.implementation` for warm-up + timed steps in this process; print one JSON record."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = model_config(args.size, args.codebook_size, args.grid)
    model = build(args.implementation, cfg, device)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model  # the driver passes --compile only when wanted
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.codebook_size, (args.batch, cfg.sequence_length), generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = step_model(codes, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    tic = time.perf_counter()
    losses = [step() for _ in range(args.warmup + (2 if args.compile else 0))]  # compiled: 2 more, past recompiles
    sync()
    compile_and_warmup_s = time.perf_counter() - tic
    timed, times, peak = timed_steps(step, args.steps, device)
    losses += timed
    tokens = args.batch * cfg.sequence_length
    return {"implementation": args.implementation, "size": args.size, "compile": bool(args.compile),
            "parameters": parameters, "flops_per_token": training_flops_per_token(cfg),
            "tokens_per_step": tokens, "step_times_s": times, "tokens_per_s": tokens * len(times) / sum(times),
            "peak_bytes": peak, "losses": [float(x) for x in losses], "warmup_s": compile_and_warmup_s}


# ------------------------------------------------------------------------------------- driver side

def run_worker(args, implementation: str, size: str, compile_: bool, memory: bool = False) -> dict:
    """One worker process. memory=True: one timed step with every allocation of 128 KiB or more mmapped and
    unmapped when freed (no glibc heap retention), so that the RSS high-water mark follows the live tensors; that
    costs page faults, so the speed runs keep glibc's defaults and take no memory figure."""
    steps = 1 if memory else args.steps
    command = [sys.executable, os.path.abspath(__file__), "--worker", implementation, "--size", size,
               "--codebook-size", str(args.codebook_size), "--grid", str(args.grid), "--batch", str(args.batch),
               "--steps", str(steps), "--warmup", str(args.warmup), "--device", args.device,
               "--threads", str(args.threads)] + (["--compile"] if compile_ else [])
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if memory and args.device == "cpu" else {})}
    return run_json_worker(command, f"{implementation} {size}", env=env)


def variants_of(size: str, args) -> list[tuple[str, bool]]:
    """(implementation, compiled) pairs measured at `size`."""
    compiled = bool(args.compile) and (args.compile == "all" or size in args.compile.split(","))
    variants = [(impl, c) for c in ([False, True] if compiled else [False]) for impl in IMPLEMENTATIONS[:2]]
    return variants + ([("ours_checkpointed", False)] if args.checkpoint_activations else [])


def compare(args, console: Console | None = None) -> dict:
    """All sizes, ours and lean (eager, and compiled with --compile) in alternating fresh processes."""
    rates = [machine_rate(args.device)]
    records = []
    for size in args.sizes.split(","):
        for repeat in range(args.repeats):
            for impl, c in variants_of(size, args):
                records.append({**run_worker(args, impl, size, c), "repeat": repeat})
                if console:
                    r = records[-1]
                    console.log(f"{size} {impl}{' compiled' if c else ''} #{repeat}: {r['tokens_per_s']:,.0f} "
                                f"tokens/s")
        for impl, c in variants_of(size, args):
            records.append({**run_worker(args, impl, size, c, memory=True), "repeat": "memory"})
    rates.append(machine_rate(args.device))
    peak_rate = max(r["flops"] for r in rates)
    summary = []
    for size in args.sizes.split(","):
        variants = variants_of(size, args)
        by = {(impl, c): [r for r in records if r["size"] == size and r["implementation"] == impl
                          and r["compile"] == c and r["repeat"] != "memory"] for impl, c in variants}
        memory = {(r["implementation"], r["compile"]): r["peak_bytes"] for r in records
                  if r["size"] == size and r["repeat"] == "memory"}
        if len({rs[0]["parameters"] for rs in by.values()}) != 1:  # the same model in every variant
            raise SystemExit(f"size {size}: ours and lean differ in parameter count: "
                             + ", ".join(f"{k}: {v[0]['parameters']:,}" for k, v in by.items()))
        for c in sorted({c for _, c in variants}):
            ours, lean = by[("ours", c)], by[("lean", c)]
            row = {"size": size, "compile": c, "parameters": ours[0]["parameters"]}
            measured = [("ours", ours), ("lean", lean)]
            if not c and ("ours_checkpointed", False) in by:
                measured.append(("ours_checkpointed", by[("ours_checkpointed", False)]))
            for impl, rs in measured:
                best = max(r["tokens_per_s"] for r in rs)  # the least disturbed repeat of each
                row[impl] = {"tokens_per_s": best, "tokens_per_s_all": [r["tokens_per_s"] for r in rs],
                             "peak_bytes": memory[(impl, c)],
                             "mfu": best * rs[0]["flops_per_token"] / peak_rate, "warmup_s": rs[0]["warmup_s"]}
            row["speed_ratio"] = row["ours"]["tokens_per_s"] / row["lean"]["tokens_per_s"]
            row["memory_ratio"] = row["ours"]["peak_bytes"] / max(1, row["lean"]["peak_bytes"])
            row["max_loss_difference"] = max(abs(a - b) for a, b in zip(ours[0]["losses"], lean[0]["losses"]))
            if "ours_checkpointed" in row:
                checkpointed = by[("ours_checkpointed", False)][0]
                row["checkpointing_time_ratio"] = row["ours"]["tokens_per_s"] / row["ours_checkpointed"]["tokens_per_s"]
                row["checkpointing_loss_difference"] = max(abs(a - b) for a, b in zip(ours[0]["losses"],
                                                                                       checkpointed["losses"]))
            summary.append(row)
    return {"records": records, "summary": summary, "gemm_rates": rates, "peak_rate": peak_rate}


def checkpointing_table(summary: list[dict]) -> str:
    header = ["size", "tokens/s", "checkpointed tokens/s", "time cost", "peak MiB", "checkpointed peak MiB",
              "max loss diff"]
    rows = [[s["size"], f"{s['ours']['tokens_per_s']:,.0f}", f"{s['ours_checkpointed']['tokens_per_s']:,.0f}",
             f"{s['checkpointing_time_ratio']:.2f}x", f"{s['ours']['peak_bytes'] / MIB:,.0f}",
             f"{s['ours_checkpointed']['peak_bytes'] / MIB:,.0f}", f"{s['checkpointing_loss_difference']:.1e}"]
            for s in summary if "ours_checkpointed" in s]
    return markdown_table(header, rows)


def table(summary: list[dict]) -> str:
    header = ["size", "parameters", "compile", "ours tokens/s", "lean tokens/s", "ours / lean", "ours MFU",
              "lean MFU", "ours peak MiB", "lean peak MiB", "max loss diff"]
    rows = [[s["size"], f"{s['parameters']:,}", "yes" if s["compile"] else "no", f"{s['ours']['tokens_per_s']:,.0f}",
             f"{s['lean']['tokens_per_s']:,.0f}", f"{s['speed_ratio']:.2f}x", f"{s['ours']['mfu']:.1%}",
             f"{s['lean']['mfu']:.1%}", f"{s['ours']['peak_bytes'] / MIB:,.0f}",
             f"{s['lean']['peak_bytes'] / MIB:,.0f}", f"{s['max_loss_difference']:.1e}"] for s in summary]
    return markdown_table(header, rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="nano,small,B", help="comma-separated keys of stage2_generator SIZES")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--grid", type=int, default=16, help="codes per side: grid^2 codes per sequence")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per implementation and size")
    parser.add_argument("--compile", nargs="?", const="all", default="",
                        help="also both implementations under torch.compile: at every size, or at the comma-separated "
                             "sizes given")
    parser.add_argument("--checkpoint-activations", action="store_true",
                        help="also ours with model.checkpoint_activations (its time and memory cost)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="nano, K = 1,024, 8 x 8, 3 steps; print only")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parse_quick_args(parser, QUICK, argv)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        args.implementation = args.worker
        print(json.dumps(worker(args)))
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # the GEMM yardstick runs on the workers' thread count
    console = Console()
    start = cpu_times()
    results = compare(args, console)
    other = other_cpu_share(start)
    console.print(table(results["summary"]))
    if args.checkpoint_activations:
        console.print(checkpointing_table(results["summary"]))
    if args.quick:
        return
    p = provenance("bench_train_step.py", sys.argv[1:], "stage2_generator", packages=("x-transformers",))
    results.update(provenance=p, other_cpu_share=other, settings={k: v for k, v in vars(args).items()
                                                                   if k not in ("worker", "size")})
    rate = results["peak_rate"]
    section = f"""## Stage-2 training step: ours vs a lean plain-PyTorch implementation

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
{args.threads} torch threads, torch {p['torch']}, x-transformers {p['x-transformers']}, device {args.device}).
Raw numbers: `benchmarks/results/train_step.json`.

Forward + backward + AdamW on a batch of {args.batch} random sequences of {args.grid}x{args.grid} codes
(K = {args.codebook_size:,}, class-conditioned), {'fp32' if args.device == 'cpu' else 'bf16 autocast'}; ours =
`stage2_generator.Generator`, lean = `benchmarks/lean_generator.py` loaded with ours' weights (same parameter
count, asserted; "max loss diff" = the largest difference of the two's losses over all their steps). Each
(implementation, size) ran {args.repeats} time(s) in fresh processes, alternating; the table keeps
each one's fastest repeat ({args.steps} timed steps after {args.warmup} warm-up, compiled: 2 more). MFU = model FLOPs
(6 x matmul parameters + 12 x layers x width x positions per token) x tokens/s / {rate / 1e9:,.1f} GFLOP/s, the
higher of this run's two GEMM measurements ({', '.join(f"{r['flops'] / 1e9:,.1f}" for r in results['gemm_rates'])},
{results['gemm_rates'][0]['what']}). Peak MiB: {'the RSS high-water mark during the timed steps above the RSS '
'before them, in a separate process per variant with glibc mapping every allocation >= 128 KiB, so that RSS '
'follows the live tensors' if args.device == 'cpu'
else 'max_memory_allocated'}. Other processes used {other:.0%} of the
machine's CPU time during the run.

{table(results['summary'])}
"""
    if args.checkpoint_activations:
        section += f"""
Activation checkpointing (`model.checkpoint_activations=true`: each block keeps its input only and recomputes
its activations in the backward), ours eager, same run: the time cost is tokens/s without / with it.

{checkpointing_table(results['summary'])}
"""
    publish("train_step", results, section)


if __name__ == "__main__":
    main()
