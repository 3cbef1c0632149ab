"""Where a stage-2 training step spends its time: torch.profiler over a few steps of our generator (or the lean
reference), the top operators by self CPU time and how many kernels of each one step launches.

    python benchmarks/profile_train_step.py [--implementation ours|lean] [--size B] [--codebook-size 16384]
                                            [--grid 16] [--batch 4] [--steps 2] [--threads 1] [--top 15]

The step is bench_train_step.py's (forward + backward + AdamW, fp32 on the CPU), after one warm-up step. It
prints a table; nothing is written. This is how the decoder's overhead was found (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_train_step import NUM_CLASSES, build, model_config  # noqa: E402
from benchmarks.common import markdown_table  # noqa: E402
from stage2_generator.model import parameter_groups  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--implementation", choices=("ours", "lean"), default="ours")
    parser.add_argument("--size", default="B")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15, help="operators shown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.size, args.codebook_size, args.grid)
    model = build(args.implementation, cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.codebook_size, (args.batch, cfg.sequence_length), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)

    def step() -> None:
        model(codes, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [[e.key, f"{e.self_cpu_time_total / 1e3 / args.steps:,.1f}", f"{e.self_cpu_time_total / total:.1%}",
             f"{e.count / args.steps:,.0f}"] for e in events[:args.top]]
    print(f"{args.implementation}, size {args.size} ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"K = {cfg.codebook_size:,}, {cfg.sequence_length} codes, batch {args.batch}, {args.threads} thread(s): "
          f"{total / 1e3 / args.steps:,.0f} ms of aten self time per step, "
          f"{sum(e.count for e in events) / args.steps:,.0f} aten calls per step")
    print(markdown_table(["operator", "ms per step", "share", "calls per step"], rows))


if __name__ == "__main__":
    main()
