"""Encode and decode throughput of the paper-size SimVQ tokenizer at 128x128 on this machine.

    python benchmarks/bench_tokenizer.py [--batch 8] [--repeats 3] [--codebook-size 65536] [--quick]

The model is the SimVQ paper's ImageNet-128 autoencoder (ch 128, ch_mult [1,2,2,4], 2 res blocks,
z 128, 16x16 codes) in eval mode, fp32, all cores. Encode = images -> indices (encoder + exact
nearest-code search, including the K x d x d codebook transform, once per call); decode = indices ->
images (codebook lookup through W + decoder). FLOPs per image come from torch's FlopCounterMode
(multiply-add = 2 FLOPs) at batch 1, so the encode figure includes one K x d x d codebook transform
(2.1 GFLOP at K = 65,536) that a batch shares; the share of the machine's fp32 GEMM rate, measured in the same run, says how
close the convolutions get to the hardware. Peak memory = the RSS high-water mark above the RSS before
the call. Writes benchmarks/results/tokenizer.json and the tokenizer section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (MIB, cpu_times, gemm_rate, markdown_table, other_cpu_share,  # noqa: E402
                               peak_rss_increase, provenance, publish)
from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402

RESOLUTION = 128


def flops_per_image(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def measure(tokenizer: Tokenizer, batch: int, repeats: int) -> dict:
    images = torch.rand(batch, 3, RESOLUTION, RESOLUTION) * 2 - 1
    indices = tokenizer.encode(images)  # warm-up, and the codes to decode
    tokenizer.decode(indices)
    one_image, one_code = images[:1], indices[:1]
    flops = {"encode": flops_per_image(lambda: tokenizer.encode(one_image)),
             "decode": flops_per_image(lambda: tokenizer.decode(one_code))}
    out = {}
    for name, run in (("encode", lambda: tokenizer.encode(images)), ("decode", lambda: tokenizer.decode(indices))):
        runs = [peak_rss_increase(run) for _ in range(repeats)]
        seconds = statistics.median(s for s, _ in runs)
        out[name] = {"seconds_per_batch": seconds, "images_per_s": batch / seconds,
                     "flops_per_image": flops[name], "gflops_per_s": flops[name] * batch / seconds / 1e9,
                     "peak_rss_increase_bytes": max(b for _, b in runs), "times_s": [s for s, _ in runs]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codebook-size", type=int, default=65536)
    parser.add_argument("--quick", action="store_true", help="one repeat, batch 2, print only, write nothing")
    args = parser.parse_args()
    batch, repeats = (2, 1) if args.quick else (args.batch, args.repeats)
    torch.set_num_threads(os.cpu_count())
    load_start = cpu_times()
    gemm_before = gemm_rate()
    torch.manual_seed(0)
    config = TokenizerConfig(AutoencoderConfig(), QuantizerConfig(kind="simvq", codebook_size=args.codebook_size))
    tokenizer = Tokenizer(config).eval()
    measured = measure(tokenizer, batch, repeats)
    gemm_after = gemm_rate()
    gemm = statistics.median([*gemm_before["times_s"], *gemm_after["times_s"]])
    gemm_gflops = 2 * 2048**3 / gemm / 1e9
    results = {
        "provenance": provenance("bench_tokenizer.py", sys.argv[1:], "stage1_tokenizer"),
        "model": {"config": "SimVQ paper ImageNet-128 (configs/tokenizer/imagenet128_simvq_*.yaml)",
                  "codebook_size": args.codebook_size, "resolution": RESOLUTION,
                  "parameters": sum(p.numel() for p in tokenizer.parameters()), "tokens_per_image": 256},
        "settings": {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads(), "dtype": "fp32"},
        "gemm_gflops": gemm_gflops, "gemm_gflops_before": gemm_before["gflops"], "gemm_gflops_after": gemm_after["gflops"],
        "other_cpu_share": other_cpu_share(load_start),
        **measured,
    }
    header = ["direction", "images/s", "GFLOP/image", "GFLOP/s", "% of GEMM", "peak MiB (increase)"]
    rows = [[name, f"{m['images_per_s']:.2f}", f"{m['flops_per_image'] / 1e9:.1f}", f"{m['gflops_per_s']:.1f}",
             f"{m['gflops_per_s'] / gemm_gflops:.0%}", f"{m['peak_rss_increase_bytes'] / MIB:,.0f}"]
            for name, m in ((n, results[n]) for n in ("encode", "decode"))]
    table = Table(title=f"tokenizer at {RESOLUTION}px, batch {batch}, GEMM {gemm_gflops:.0f} GFLOP/s")
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.quick:
        return
    p = results["provenance"]
    section = f"""## Tokenizer encode / decode (stage 1)

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
torch {p['torch']}). Raw numbers: `benchmarks/results/tokenizer.json`.

The SimVQ paper's ImageNet-128 tokenizer ({results['model']['parameters'] / 1e6:.1f}M parameters, K = {args.codebook_size:,},
16x16 = 256 codes per image), fp32, eval mode, batch {batch}, median of {repeats}. fp32 GEMM rate measured in the
same run: {gemm_gflops:.0f} GFLOP/s. Other processes used {results['other_cpu_share']:.0%} of the machine's CPU
time during the run.

{markdown_table(header, rows)}
"""
    publish("tokenizer", results, section)


if __name__ == "__main__":
    main()
