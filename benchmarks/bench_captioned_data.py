"""Pre-tokenization from WebDataset tars vs from an image folder vs pure encode, on the same images in the same
run; and the text encoder's captions/s per batch size.

    python benchmarks/bench_captioned_data.py [--max-images N] [--per-tar 500] [--repeats 3] [--threads 1]
                                              [--workers 2] [--quick]

Data: the bundled emoji's train split at 64 px, written once as a metadata.jsonl folder of PNG files and once
as WebDataset tars of `--per-tar` samples (the same PNG bytes in both), so both sources open, decode, resize and
crop the same real files; the tokenizer is the CPU demo model with random weights, 32 px, aug none
(benchmarks/bench_pretokenize.py's setting). Runs alternate (encode, folder, tars, encode, ...), each figure is
the median over the repeats, so a change in the machine's load hits every side. Targets: tars >= the folder's
rate, both >= 85% of pure encode.

Text: all-MiniLM-L6-v2 (the offline default) over the split's captions, at each batch size, on the CPU with
every core. Writes benchmarks/results/captioned_data.json and its section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_pretokenize import RESOLUTION, TOKENIZER_CONFIG, encode_batches, time_encode  # noqa: E402
from benchmarks.common import REPO, cpu_times, markdown_table, other_cpu_share, provenance, publish  # noqa: E402
from pipelines.config import PretokenizeConfig  # noqa: E402
from pipelines.pretokenize import pretokenize  # noqa: E402
from pipelines.text import TextEncoder  # noqa: E402
from simvq_common.config import load_config  # noqa: E402
from image_data.captioned_folder import write_captioned_folder  # noqa: E402
from stage1_tokenizer.config import TokenizerTrainConfig  # noqa: E402
from image_data.emoji import EmojiDataset  # noqa: E402
from stage1_tokenizer.tokenizer import Tokenizer  # noqa: E402
from image_data.webdataset import write_webdataset  # noqa: E402

TARGET = 0.85
TEXT_BATCH_SIZES = (1, 8, 32, 128, 512)


def time_text_encoder(captions: list[str], batch_sizes, repeats: int) -> dict[int, float]:
    """Captions per second of the default encoder at each batch size (median of `repeats` passes)."""
    rates = {}
    for batch_size in batch_sizes:
        encoder = TextEncoder(device="cpu", batch_size=batch_size)
        encoder.encode(captions[:batch_size])  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            encoder.encode(captions)
            seconds.append(time.perf_counter() - start)
        rates[batch_size] = len(captions) / statistics.median(seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-images", type=int, default=0, help="0 = the whole train split (3,404 images)")
    parser.add_argument("--per-tar", type=int, default=500, help="samples per WebDataset tar")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the tokenizer (every side)")
    parser.add_argument("--workers", type=int, default=PretokenizeConfig.num_workers, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=PretokenizeConfig.batch_size)
    parser.add_argument("--quick", action="store_true", help="256 images, one repeat, print only, write nothing")
    args = parser.parse_args()
    max_images, repeats = (256, 1) if args.quick else (args.max_images, args.repeats)
    console = Console()
    emoji = EmojiDataset("train", 64)
    n = min(len(emoji), max_images) if max_images else len(emoji)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"folder": write_captioned_folder(emoji, tmp / "folder", "jsonl", indices=range(n)),
                   "tars": write_webdataset(emoji, tmp / "tars", args.per_tar, indices=range(n))}
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        tokenizer = Tokenizer(load_config(TokenizerTrainConfig, TOKENIZER_CONFIG).tokenizer).eval()
        tokenizer.save_pretrained(tmp / "tokenizer")
        batches = encode_batches(str(sources["folder"]), "none", n, args.batch_size)
        configs = {name: load_config(PretokenizeConfig, None, [
            f"tokenizer={tmp / 'tokenizer'}", f"data={source}", f"resolution={RESOLUTION}", "aug=none",
            f"batch_size={args.batch_size}", f"num_workers={args.workers}", f"images_per_shard={args.per_tar}",
            f"out={tmp / name}_cache"]) for name, source in sources.items()}
        time_encode(tokenizer, batches[:2])  # warm-up: thread pool, allocator
        load_start = cpu_times()
        seconds = {"encode": [], "folder": [], "tars": []}
        for _ in range(repeats):
            seconds["encode"].append(time_encode(tokenizer, batches))
            for name, cfg in configs.items():
                shutil.rmtree(cfg.out, ignore_errors=True)
                start = time.perf_counter()
                pretokenize(cfg)
                seconds[name].append(time.perf_counter() - start)
        other = other_cpu_share(load_start)
        torch.set_num_threads(os.cpu_count())
        captions = [emoji.caption(i) for i in range(n)]
        text_rates = time_text_encoder(captions, TEXT_BATCH_SIZES[:3] if args.quick else TEXT_BATCH_SIZES, repeats)
    rates = {name: n / statistics.median(s) for name, s in seconds.items()}
    ratios = {"tars_vs_folder": rates["tars"] / rates["folder"], "folder_vs_encode": rates["folder"] / rates["encode"],
              "tars_vs_encode": rates["tars"] / rates["encode"]}
    passed = ratios["tars_vs_folder"] >= 1.0 and min(ratios["folder_vs_encode"], ratios["tars_vs_encode"]) >= TARGET
    results = {
        "provenance": provenance("bench_captioned_data.py", sys.argv[1:], "image_data/webdataset.py",
                                 packages=("sentence-transformers",)),
        "settings": {"images": n, "per_tar": args.per_tar, "tars": -(-n // args.per_tar), "resolution": RESOLUTION,
                     "source_resolution": 64, "batch_size": args.batch_size, "workers": args.workers,
                     "threads": args.threads, "repeats": repeats,
                     "tokenizer": str(TOKENIZER_CONFIG.relative_to(REPO)) + " (random weights)"},
        "times_s": seconds, "images_per_s": rates, "ratios": ratios, "target": TARGET, "passed": passed,
        "text_captions_per_s": {str(b): r for b, r in text_rates.items()}, "text_threads": os.cpu_count(),
        "other_cpu_share": other,
    }
    header = ["measurement", "images/s", "% of pure encode"]
    rows = [["pure encode (tensors in memory)", f"{rates['encode']:.1f}", "100%"],
            ["pre-tokenization from a metadata.jsonl folder of PNGs", f"{rates['folder']:.1f}",
             f"{ratios['folder_vs_encode']:.0%}"],
            ["pre-tokenization from WebDataset tars (the same PNGs)", f"{rates['tars']:.1f}",
             f"{ratios['tars_vs_encode']:.0%}"]]
    text_rows = [[str(b), f"{r:,.0f}"] for b, r in text_rates.items()]
    console.print(markdown_table(header, rows))
    console.print(markdown_table(["text batch size", "captions/s"], text_rows))
    verdict = "PASS" if passed else "FAIL"
    console.print(f"tars / folder = {ratios['tars_vs_folder']:.2f} (target >= 1); both >= {TARGET:.0%} of pure "
                  f"encode: {verdict}; other processes used {other:.0%} of the CPU time")
    if args.quick:
        return
    p, s = results["provenance"], results["settings"]
    section = f"""## Pre-tokenization from WebDataset tars vs an image folder vs pure encode

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
torch {p['torch']}). Raw numbers: `benchmarks/results/captioned_data.json`.

{s['images']:,} emoji of the train split at 64 px, written once as a metadata.jsonl folder of PNGs and once as
{s['tars']} WebDataset tars of {s['per_tar']} (the same PNG bytes); encoded at {RESOLUTION} px, aug none, by the
CPU demo tokenizer (`{s['tokenizer']}`), batch {s['batch_size']}, {s['workers']} DataLoader worker(s),
{s['threads']} torch thread(s) for the model; one cache shard per tar for the tars, {s['per_tar']} images per
shard for the folder. Median of {repeats} alternating runs; pre-tokenization is the whole `pretokenize` call
(the tars' header scan included). Other processes used {other:.0%} of the machine's CPU time.

{markdown_table(header, rows)}

Tars / folder: {ratios['tars_vs_folder']:.2f}x (target >= 1); both >= {TARGET:.0%} of pure encode: **{verdict}**.

Text embedding (all-MiniLM-L6-v2, the offline default, {results['text_threads']} CPU threads) over the
{s['images']:,} captions (emoji names), per encoder batch size (`text.batch_size`):

{markdown_table(["text batch size", "captions/s"], text_rows)}
"""
    publish("captioned_data", results, section)


if __name__ == "__main__":
    main()
