"""Cache loader throughput: the tokens/s `CacheLoader` hands to stage 2 from memory-mapped shards.

    python benchmarks/bench_cache_loader.py [--sequences 100000] [--grid 16] [--codebook-size 65536]
                                            [--shards 8] [--batch 256] [--repeats 3] [--quick]

Builds a cache of random codes with the format's own writer: 16x16 = 256 codes per sequence at K = 65,536
(uint16, the paper's ImageNet-128 tokenizer's shape), labels of 1,000 classes, the class name as caption and
a 384-d text embedding per caption. Then times whole epochs of `CacheLoader` (shuffled by seed and epoch,
batches of int64 torch tensors) in three settings: codes + labels on one rank; the same with text
embeddings; rank 0 of 8 (an eighth of the epoch, strided). Each figure is the median over the repeats (one
epoch each). The page cache is warm (the cache was just written): a first epoch straight from a cold disk
reads at the disk's speed instead. Target: >= 1M tokens/s. Writes benchmarks/results/cache_loader.json and
the cache_loader section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import MIB, cpu_times, markdown_table, other_cpu_share, provenance, publish  # noqa: E402
from stage2_generator.cache_format import manifest_header, shard_image_range  # noqa: E402
from stage2_generator.cache_loader import CacheLoader  # noqa: E402
from stage2_generator.cache_reader import CodeCache  # noqa: E402
from stage2_generator.cache_writer import CacheWriter, ShardContent, caption_table  # noqa: E402

NUM_CLASSES, EMBED_DIM = 1000, 384
TARGET = 1e6


def build_cache(path: Path, sequences: int, grid: int, codebook_size: int, shards: int) -> None:
    """`sequences` random sequences (one view per image) in `shards` shards, written by the format's writer."""
    per_shard = -(-sequences // shards)
    header = manifest_header(
        tokenizer_fingerprint="benchmark", tokenizer_path="", downsample_factor=8, codebook_size=codebook_size,
        grid=(grid, grid), resolution=grid * 8, augmentation="none", base_resolution=grid * 8,
        dataset={"source": "random codes", "split": "train", "max_images": 0, "num_images": sequences,
                 "class_names": [f"class {c}" for c in range(NUM_CLASSES)], "caption_source": "class names"},
        text_encoder={"name": "random unit vectors", "dim": EMBED_DIM}, images_per_shard=per_shard, batch_size=1)
    writer = CacheWriter(path, header, overwrite=True)
    writer.prepare()
    rng = np.random.default_rng(0)
    for s in range(header["sharding"]["num_shards"]):
        begin, end = shard_image_range(s, sequences, per_shard)
        labels = rng.integers(0, NUM_CLASSES, end - begin)
        ids, table = caption_table([f"class {c}" for c in labels])
        embeddings = rng.standard_normal((len(table), EMBED_DIM)).astype(np.float32)
        content = ShardContent(codes=rng.integers(0, codebook_size, (end - begin, grid, grid)), labels=labels,
                               image_index=np.arange(begin, end), view=np.zeros(end - begin), caption_ids=ids,
                               captions=table, text_embeddings=embeddings / np.linalg.norm(embeddings, axis=1,
                                                                                          keepdims=True),
                               image_range=(begin, end))
        writer.write_shard(s, content)
    writer.finish()


def time_epochs(loader: CacheLoader, repeats: int) -> tuple[list[float], int]:
    """Seconds per epoch (epochs 0, 1, ...) and the tokens one epoch yields."""
    times, tokens = [], 0
    for epoch in range(repeats):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        tokens = sum(batch.codes.numel() for batch in loader)
        times.append(time.perf_counter() - start)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--codebook-size", type=int, default=65536)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10,000 sequences, one repeat, print only")
    args = parser.parse_args()
    sequences, repeats = (10_000, 1) if args.quick else (args.sequences, args.repeats)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        build_cache(path, sequences, args.grid, args.codebook_size, args.shards)
        size = sum(f.stat().st_size for f in (path / "shards").glob("*.safetensors"))
        load_start = cpu_times()
        start = time.perf_counter()
        cache = CodeCache(path, expect_codebook_size=args.codebook_size)
        open_s = time.perf_counter() - start
        settings = {"codes + labels, 1 rank": CacheLoader(cache, args.batch, seed=0),
                    "codes + labels + text embeddings, 1 rank": CacheLoader(cache, args.batch, seed=0, text=True),
                    "codes + labels, rank 0 of 8": CacheLoader(cache, args.batch, seed=0, rank=0, world_size=8)}
        measured = {}
        for name, loader in settings.items():
            times, tokens = time_epochs(loader, repeats)
            measured[name] = {"times_s": times, "tokens_per_epoch": tokens,
                              "tokens_per_s": tokens / statistics.median(times),
                              "sequences_per_s": tokens / args.grid**2 / statistics.median(times)}
        other = other_cpu_share(load_start)
    results = {
        "provenance": provenance("bench_cache_loader.py", sys.argv[1:], "stage2_generator/cache_*.py",
                                 packages=("numpy",)),
        "settings": {"sequences": sequences, "tokens_per_sequence": args.grid**2, "codebook_size": args.codebook_size,
                     "dtype": str(cache.manifest["dtype"]), "shards": args.shards, "batch": args.batch,
                     "repeats": repeats, "shard_bytes": size},
        "open_s": open_s,
        "results": measured,
        "target_tokens_per_s": TARGET,
        "other_cpu_share": other,
    }
    header = ["setting", "tokens/s", "sequences/s", "target >= 1M tokens/s"]
    rows = [[name, f"{m['tokens_per_s']:,.0f}", f"{m['sequences_per_s']:,.0f}",
             "PASS" if m["tokens_per_s"] >= TARGET else "FAIL"] for name, m in measured.items()]
    console.print(markdown_table(header, rows))
    console.print(f"open: {open_s * 1e3:.1f} ms; other processes used {other:.0%} of the machine's CPU time")
    if args.quick:
        return
    p, s = results["provenance"], results["settings"]
    section = f"""## Cache loader (`stage2_generator.cache_loader.CacheLoader`)

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
numpy {p['numpy']}). Raw numbers: `benchmarks/results/cache_loader.json`.

A cache of {s['sequences']:,} random sequences of {s['tokens_per_sequence']} codes (K = {s['codebook_size']:,},
{s['dtype']}) in {s['shards']} shards ({s['shard_bytes'] / MIB:,.0f} MiB), written by the format's writer, with
1,000 class-name captions and 384-d text embeddings. One shuffled epoch per repeat, batches of {s['batch']}
sequences as int64 torch tensors, median of {s['repeats']}; page cache warm (the cache was just written).
Opening the cache (manifest, memory maps of every shard) took {open_s * 1e3:.1f} ms. Other processes used
{other:.0%} of the machine's CPU time during the run.

{markdown_table(header, rows)}
"""
    publish("cache_loader", results, section)


if __name__ == "__main__":
    main()
