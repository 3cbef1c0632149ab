"""Sampling throughput of the stage-2 generator: our KV-cached `generate` against x-transformers' own.

    python benchmarks/bench_sampling.py [--size small] [--codebook-size 16384] [--grid 16] [--batch 8]
                                        [--repeats 3] [--quick]

One class-conditioned generator (`stage2_generator.model.Generator`, default size "small", K = 16,384, a
16 x 16 grid = 256 codes, fp32, eval mode, one torch thread) samples a batch of 8 images' codes in four
ways, in the same run:

- (a) ours, KV cache: `generate` (prefill of the class token, then one cached decode step per code);
- (b) ours, no cache: `generate(use_cache=False)`, which recomputes the whole sequence at every step;
- (c) x-transformers: `AutoregressiveWrapper(TransformerWrapper(...)).generate(..., cache_kv=True)` for a
  TransformerWrapper whose Decoder has our settings (width, depth, heads, RMSNorm, SwiGLU with our hidden
  width, no biases, flash attention; rotary positions, no absolute ones) and our vocabulary K, from a prompt
  of one token, the same number of new codes, temperature 1 and no filtering (`filter_logits_fn=identity`);
- (d) ours, KV cache with classifier-free guidance at scale 2 (the conditional and the null batch run as
  one doubled batch);
- (e) ours, KV cache, with the decode step compiled (`SamplingConfig(compile=True)`: torch.compile of one
  step; the preallocated cache and the position as a tensor keep one graph for every position), on a
  second copy of the same model; its warm-up round includes the compilation.

All at temperature 1 without top-k / top-p. Ours draws each code by inverting the CDF of its float64
softmax at a per-sample seeded uniform; x-transformers draws with `torch.multinomial`. Our output head is
re-initialised at random (it starts at zero, which would make every distribution uniform). Tokens/s =
batch x codes / seconds (guidance: the batch's own samples, not the doubled batch), the median over
`--repeats` rounds of (a), (c), (d), (e) interleaved, after one untimed warm-up round; (b) runs once. Also
reports how many codes (a) and (b), and (a) and (e), sample alike (all of them, but for rare fp32 rounding ties).
Writes benchmarks/results/sampling.json and the sampling section of docs/BENCHMARKS.md;
`--quick` (size nano, K = 4,096, 8 x 8 grid, batch 4, one round) prints only and writes nothing.

One thread by default: a decode step is hundreds of small ops on a batch of 8 rows, so a second thread gains
little, and on a shared machine where another job holds a core every op's parallel region waits for it (with
2 threads the quick run went 10x slower than with 1 on the 2-core dev machine under load). `--threads 2` to
measure both cores on a quiet machine.
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
                               provenance, publish)
from stage2_generator.config import GeneratorConfig, SamplingConfig  # noqa: E402
from stage2_generator.decoders.llama import swiglu_hidden  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402
from stage2_generator.sampling import generate

NUM_CLASSES = 1000
GUIDANCE = 2.0
NAMES = {"ours_cache": "(a) ours, KV cache", "ours_no_cache": "(b) ours, no cache (use_cache=False)",
         "x_transformers": "(c) x-transformers AutoregressiveWrapper, cache_kv=True",
         "ours_cfg": f"(d) ours, KV cache, guidance {GUIDANCE:g} (doubled batch)",
         "ours_compiled": "(e) ours, KV cache, compiled decode step"}
QUICK = {"size": "nano", "codebook_size": 4096, "grid": 8, "batch": 4, "repeats": 1}


def build_ours(cfg: GeneratorConfig) -> Generator:
    torch.manual_seed(0)
    model = Generator(cfg)
    torch.nn.init.normal_(model.head.weight, std=cfg.dim**-0.5)  # zero at init: every distribution uniform
    return model.eval()


def build_reference(cfg: GeneratorConfig):
    """x-transformers' own wrapper around a TransformerWrapper with our architecture and vocabulary."""
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    torch.manual_seed(0)
    d = cfg.dim
    net = TransformerWrapper(
        num_tokens=cfg.codebook_size, max_seq_len=cfg.sequence_length, use_abs_pos_emb=False,
        attn_layers=Decoder(dim=d, depth=cfg.depth, heads=cfg.heads, attn_dim_head=d // cfg.heads,
                            use_rmsnorm=True, ff_glu=True, ff_swish=True, ff_mult=swiglu_hidden(d) / d,
                            ff_no_bias=True, attn_flash=True, rotary_pos_emb=True))
    return AutoregressiveWrapper(net).eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="a key of stage2_generator.config.SIZES")
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--grid", type=int, default=16, help="codes per side: grid^2 codes per image")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (a), (c), (d); (b) runs once")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: see the module docstring)")
    parser.add_argument("--quick", action="store_true",
                        help="size nano, K = 4,096, 8 x 8 grid, batch 4, one round; print only, write nothing")
    args = parse_quick_args(parser, QUICK)
    torch.set_num_threads(args.threads)
    console = Console()
    cfg = GeneratorConfig(size=args.size, conditioning="class", codebook_size=args.codebook_size,
                          grid=[args.grid, args.grid], num_classes=NUM_CLASSES)
    ours, reference, compiled = build_ours(cfg), build_reference(cfg), build_ours(cfg)
    length, batch = cfg.sequence_length, args.batch
    labels = torch.arange(batch) % NUM_CLASSES
    indices = list(range(batch))
    prompt = torch.zeros(batch, 1, dtype=torch.long)
    plain, guided = SamplingConfig(temperature=1.0, seed=0), SamplingConfig(guidance_scale=GUIDANCE, seed=0)
    plain_compiled = SamplingConfig(temperature=1.0, seed=0, compile=True)
    from x_transformers.autoregressive_wrapper import identity

    runs = {
        "ours_cache": lambda: generate(ours, labels, indices, plain),
        "x_transformers": lambda: reference.generate(prompt, length, temperature=1.0, filter_logits_fn=identity,
                                                     cache_kv=True),
        "ours_cfg": lambda: generate(ours, labels, indices, guided),
        "ours_compiled": lambda: generate(compiled, labels, indices, plain_compiled),
    }
    console.log(f"generator {args.size}: {ours.num_parameters():,} parameters (x-transformers: "
                f"{sum(p.numel() for p in reference.parameters()):,}); K = {cfg.codebook_size:,}, {length} codes, "
                f"batch {batch}, {torch.get_num_threads()} threads")
    warmup = {}
    for name, run in runs.items():  # warm-up: first-call set-up, allocator, compilation
        warmup[name] = timed(run)[0]
        console.log(f"warm-up {NAMES[name]}: {warmup[name]:.2f} s")
    load_start = cpu_times()
    times = {name: [] for name in NAMES}
    outputs = {}
    for r in range(args.repeats):
        for name, run in runs.items():
            seconds, outputs[name] = timed(run)
            times[name].append(seconds)
            console.log(f"round {r + 1}/{args.repeats} {NAMES[name]}: {seconds:.2f} s")
    seconds, outputs["ours_no_cache"] = timed(lambda: generate(ours, labels, indices, plain, use_cache=False))
    times["ours_no_cache"].append(seconds)
    console.log(f"{NAMES['ours_no_cache']}: {seconds:.2f} s")
    other = other_cpu_share(load_start)

    for name, out in outputs.items():
        assert out.shape == (batch, length), (name, tuple(out.shape))
    same = float((outputs["ours_cache"] == outputs["ours_no_cache"]).float().mean())
    same_compiled = float((outputs["ours_cache"] == outputs["ours_compiled"]).float().mean())
    tokens = batch * length
    measured = {}
    for name in NAMES:
        median = statistics.median(times[name])
        measured[name] = {"times_s": times[name], "median_s": median, "tokens_per_s": tokens / median,
                          "ms_per_step": median / length * 1e3, "warmup_s": warmup.get(name)}
    reference_rate = measured["x_transformers"]["tokens_per_s"]
    for m in measured.values():
        m["ratio_to_x_transformers"] = m["tokens_per_s"] / reference_rate
    results = {
        "provenance": provenance("bench_sampling.py", sys.argv[1:], "stage2_generator",
                                 packages=("x-transformers",)),
        "settings": {"size": args.size, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads,
                     "parameters": ours.num_parameters(), "codebook_size": cfg.codebook_size, "grid": cfg.grid,
                     "codes_per_image": length, "batch": batch, "conditioning": "class",
                     "guidance_scale": GUIDANCE, "temperature": 1.0, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "dtype": "float32", "quick": args.quick},
        "results": measured,
        "cached_equals_uncached_fraction": same,
        "compiled_equals_eager_fraction": same_compiled,
        "other_cpu_share": other,
    }
    header = ["sampler", "s per batch", "ms per code step", "tokens/s", "vs x-transformers", "warm-up s"]
    order = ["ours_cache", "ours_compiled", "ours_no_cache", "x_transformers", "ours_cfg"]
    rows = [[NAMES[n], f"{measured[n]['median_s']:.2f}", f"{measured[n]['ms_per_step']:.1f}",
             f"{measured[n]['tokens_per_s']:,.0f}", f"{measured[n]['ratio_to_x_transformers']:.2f}x",
             "-" if measured[n]["warmup_s"] is None else f"{measured[n]['warmup_s']:.1f}"] for n in order]
    console.print(markdown_table(header, rows))
    console.print(f"cached and uncached sampling agree on {same:.1%} of the codes, eager and compiled on "
                  f"{same_compiled:.1%}; other processes used {other:.0%} of the machine's CPU time")
    if args.quick:
        return
    p, s = results["provenance"], results["settings"]
    section = f"""## Sampling (`stage2_generator.sampling.generate`) vs x-transformers' `AutoregressiveWrapper.generate`

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
torch {p['torch']}, x-transformers {p['x-transformers']}). Raw numbers: `benchmarks/results/sampling.json`.

A class-conditioned generator of size "{s['size']}" (width {s['dim']}, depth {s['depth']}, {s['heads']} heads,
{s['parameters']:,} parameters), K = {s['codebook_size']:,}, {s['grid'][0]} x {s['grid'][1]} = {s['codes_per_image']}
codes per image, batch {s['batch']}, fp32, {s['threads']} torch thread(s), temperature 1, no top-k / top-p. The
x-transformers reference is `AutoregressiveWrapper(TransformerWrapper(...))` with the same architecture
(RMSNorm, SwiGLU, no biases, flash attention, rotary positions) and vocabulary, `generate(prompt of 1 token,
{s['codes_per_image']}, temperature=1, filter_logits_fn=identity, cache_kv=True)`. Ours draws by inverting a
float64 CDF at seeded per-sample uniforms (so a sample does not depend on its batch); the reference uses
`torch.multinomial`. Guidance runs the conditional and null batches as one doubled batch; its tokens/s
counts the {s['batch']} samples. The compiled sampler is a second copy of our model with the decode step under
torch.compile; its warm-up round holds the compilation. Median of {s['repeats']} interleaved rounds after a
warm-up round; the uncached sampler ran once. Cached and uncached sampling drew the same codes at {same:.1%} of
the positions, eager and compiled at {same_compiled:.1%}. Other
processes used {other:.0%} of the machine's CPU time during the run.

{markdown_table(header, rows)}
"""
    publish("sampling", results, section)


if __name__ == "__main__":
    main()
