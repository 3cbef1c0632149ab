"""What a larger codebook costs the generator: training and sampling speed of the same model at several K.

    python benchmarks/bench_codebook_cost.py [--size tiny] [--codebook-sizes 1024 8192 65536] [--grid 8]
                                             [--batch 32] [--sample-batch 64] [--steps 10] [--rounds 3]
                                             [--threads 1] [--quick]

The generation study (`simvq generation-study -c configs/study/generation_emoji.yaml`) trains one class generator
over tokenizers of K = 1,024 / 8,192 / 65,536 codes; its own speed columns come from runs that may have shared the
machine with other jobs. This measures the same generator alone, side by side: only K changes, which sizes
the code embedding and the output head (K x width each) and the softmax over K at every position.

For each K, a class-conditioned generator (default size "tiny", 9 classes, an 8 x 8 grid = 64 codes, fp32, the
output head re-initialised at random: it starts at zero) is timed in two ways:

- training: one optimizer step (the model's chunked cross-entropy over the batch of 32 random code sequences,
  backward, AdamW step, gradients zeroed), the study's batch and optimizer;
- sampling: `generate` of 64 images' codes at guidance 3 (the study's), temperature 1, no top-k (a KV-cached
  prefill and one decode step per code; guidance doubles the batch).

Rounds interleave the K (K = 1,024, 8,192, 65,536, then again), after one untimed warm-up round, and each figure
is the median over rounds of a round's steps (training: `--steps` steps per round). Tokens/s = sequences x 64 /
seconds; the ratio is to the smallest K. One torch thread by default (`--threads 2` on a quiet machine).
Writes benchmarks/results/codebook_cost.json and the codebook_cost section of docs/BENCHMARKS.md; `--quick`
(K = 256 / 1,024, 3 steps, batches of 4, one round) prints only and writes nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (cpu_times, markdown_table, other_cpu_share, parse_quick_args,  # noqa: E402
                               provenance, publish, timed_steps)
from stage2_generator.config import GeneratorConfig, SamplingConfig  # noqa: E402
from stage2_generator.model import Generator, parameter_groups  # noqa: E402
from stage2_generator.sampling import generate  # noqa: E402

NUM_CLASSES = 9  # the bundled emoji's categories
GUIDANCE = 3.0
QUICK = {"codebook_sizes": [256, 1024], "steps": 3, "batch": 4, "sample_batch": 4, "rounds": 1}


class Contender:
    """One K: its generator, optimizer and fixed batch."""

    def __init__(self, args, codebook_size: int) -> None:
        self.cfg = GeneratorConfig(size=args.size, conditioning="class", codebook_size=codebook_size,
                                   grid=[args.grid, args.grid], num_classes=NUM_CLASSES)
        torch.manual_seed(0)
        self.model = Generator(self.cfg)
        torch.nn.init.normal_(self.model.head.weight, std=self.cfg.dim**-0.5)  # zero at init: uniform logits
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        generator = torch.Generator().manual_seed(codebook_size)
        self.codes = torch.randint(codebook_size, (args.batch, self.cfg.sequence_length), generator=generator)
        self.labels = torch.arange(args.batch) % NUM_CLASSES
        self.sample_labels = torch.arange(args.sample_batch) % NUM_CLASSES
        self.sampling = SamplingConfig(guidance_scale=GUIDANCE, temperature=1.0, seed=0)
        self.steps = args.steps
        embed_and_head = self.model.token_embed.weight.numel() + self.model.head.weight.numel()
        self.parameters = {"total": self.model.num_parameters(), "embedding_and_head": embed_and_head}

    def train_step(self) -> None:
        self.model(self.codes, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_steps(self) -> float:
        """Seconds per optimizer step over `steps` steps."""
        self.model.train()
        _, seconds, _ = timed_steps(self.train_step, self.steps, torch.device("cpu"))
        return sum(seconds) / self.steps

    def sample(self) -> float:
        self.model.eval()
        start = time.perf_counter()
        generate(self.model, self.sample_labels, list(range(len(self.sample_labels))), self.sampling)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="a key of stage2_generator.config.SIZES (the study's: tiny)")
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[1024, 8192, 65536])
    parser.add_argument("--grid", type=int, default=8, help="codes per side: grid^2 codes per image")
    parser.add_argument("--batch", type=int, default=32, help="training sequences per step")
    parser.add_argument("--sample-batch", type=int, default=64, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="K = 256 / 1,024, tiny batches, one round; print only")
    args = parse_quick_args(parser, QUICK)
    torch.set_num_threads(args.threads)
    console = Console()
    contenders = {k: Contender(args, k) for k in args.codebook_sizes}
    length = next(iter(contenders.values())).cfg.sequence_length
    for k, c in contenders.items():  # warm-up: allocator, first-call set-up
        c.train_steps(), c.sample()
        console.log(f"warm-up K = {k:,}")
    start = cpu_times()
    train_s = {k: [] for k in contenders}
    sample_s = {k: [] for k in contenders}
    for r in range(args.rounds):
        for k, c in contenders.items():
            train_s[k].append(c.train_steps())
            sample_s[k].append(c.sample())
            console.log(f"round {r + 1}/{args.rounds} K = {k:,}: {train_s[k][-1] * 1e3:.0f} ms per step, "
                        f"sampling {sample_s[k][-1]:.2f} s")
    other = other_cpu_share(start)

    smallest = min(contenders)
    measured = {}
    for k, c in contenders.items():
        step, sample = statistics.median(train_s[k]), statistics.median(sample_s[k])
        measured[k] = {"parameters": c.parameters, "train_step_s": train_s[k], "sample_s": sample_s[k],
                       "train_tokens_per_s": args.batch * length / step,
                       "sample_tokens_per_s": args.sample_batch * length / sample}
    for m in measured.values():
        m["train_ratio"] = m["train_tokens_per_s"] / measured[smallest]["train_tokens_per_s"]
        m["sample_ratio"] = m["sample_tokens_per_s"] / measured[smallest]["sample_tokens_per_s"]
    header = ["K", "parameters (share in embedding + head)", "train tokens/s", f"vs K = {smallest:,}",
              "sampling tokens/s", f"vs K = {smallest:,}"]
    rows = []
    for k, m in measured.items():
        total, outer = m["parameters"]["total"], m["parameters"]["embedding_and_head"]
        rows.append([f"{k:,}", f"{total:,} ({outer / total:.0%})", f"{m['train_tokens_per_s']:,.0f}",
                     f"{m['train_ratio']:.2f}x", f"{m['sample_tokens_per_s']:,.0f}", f"{m['sample_ratio']:.2f}x"])
    table = markdown_table(header, rows)
    console.print(table)
    console.print(f"other processes used {other:.0%} of the machine's CPU time")
    if args.quick:
        return
    cfg = contenders[smallest].cfg
    results = {
        "provenance": provenance("bench_codebook_cost.py", sys.argv[1:], "stage2_generator"),
        "settings": {"size": args.size, "dim": cfg.dim, "depth": cfg.depth, "grid": cfg.grid,
                     "codes_per_image": length, "batch": args.batch, "sample_batch": args.sample_batch,
                     "steps_per_round": args.steps, "rounds": args.rounds, "guidance_scale": GUIDANCE,
                     "threads": torch.get_num_threads(), "dtype": "float32"},
        "results": {str(k): m for k, m in measured.items()},
        "other_cpu_share": other,
    }
    p = results["provenance"]
    section = f"""## The codebook's cost to the generator (training and sampling speed against K)

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
torch {p['torch']}). Raw numbers: `benchmarks/results/codebook_cost.json`.

The generation study's class generator (size "{args.size}", width {cfg.dim}, depth {cfg.depth}, {length} codes per
image, fp32, {results['settings']['threads']} torch thread(s)) at each K, only K changed: training is one AdamW step
on a batch of {args.batch} sequences ({args.steps} steps per round), sampling one `generate` call for
{args.sample_batch} images at guidance {GUIDANCE:g} (doubled batch), temperature 1, no top-k. Median over
{args.rounds} rounds that interleave the K, after a warm-up round. Other processes used {other:.0%} of the
machine's CPU time during the run.

{table}
"""
    publish("codebook_cost", results, section)


if __name__ == "__main__":
    main()
