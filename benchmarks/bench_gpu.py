"""The benchmarks of `make gpu-check`, each beside its reference in the same run, on any device.

    python benchmarks/bench_gpu.py --bench quantizer [--mode cuda|rehearsal] [--json FILE]
    python benchmarks/bench_gpu.py --all --mode rehearsal          # all of them, printed

scripts/gpu_check.py runs each benchmark in a process of its own (`--bench NAME --json FILE`), so that one's
memory, or a CUDA error that poisons its context, cannot reach the next, and writes the "GPU check" section
of docs/BENCHMARKS.md. `--mode cuda` is the GPU check (the sizes below); `--mode rehearsal` runs the same code
on the CPU at tiny sizes, to prove the code runs where no GPU is: its numbers are not GPU numbers.

- quantizer: one forward + backward of our SimVQ (`stage1_tokenizer.quantizers.SimVQ`, default search block)
  and of vector-quantize-pytorch's `SimVQ` (`rotation_trick=False`, `channel_first=True`, as in
  bench_quantizer.py) on the same (B, d, 16, 16) latents at K = 65,536, d = 128; the loss backpropagated is
  sum(quantized * g) + the quantizer's own loss, g a fixed random tensor. Targets: ours >= 3x the reference's
  tokens/s with <= 1/4 of its peak memory. Also ours with a larger search block (no target).
- sampling: guided KV-cached sampling (`stage2_generator.sampling.generate`, guidance 2: the conditional and
  the null batch as one doubled batch) against x-transformers' own `AutoregressiveWrapper.generate(...,
  cache_kv=True)` of a Decoder with our settings (bench_sampling.build_reference). x-transformers has no
  guidance, so it is given the doubled batch (2B one-token prompts): the same rows through the decoder that
  guidance needs. Tokens/s counts the B samples for both. Target: ours >= 1.5x. Also ours with the decode
  step compiled (`SamplingConfig(compile=True)`, a second copy of the model; compiled in its warm-up call),
  against ours eager.
- loss: the mean cross-entropy over K = 262,144 codes, forward + backward, chunked
  (`stage2_generator.loss.chunked_cross_entropy`, as OutputHead calls it) against naive
  (`F.cross_entropy((hidden @ W.T).float(), targets)`: the logits the plain head would make). Targets for
  this check: <= 1/4 of the naive peak memory (what chunking is for) and at most 1.5x its time (the chunked
  backward recomputes each chunk's logits: four GEMMs instead of three).
- train: GPT-B (stage2_generator config size "B"; K = 16,384, 16 x 16 = 256 codes) trained through the real
  `GeneratorTrainer` (DeepSpeed ZeRO-2, bf16) on one device, on a synthetic cache
  (bench_cache_loader.build_cache); tokens/s from metrics.jsonl after the first log window
  (bench_generator_train.throughput); no checkpoint or export (throughput only; the stages test those).
  Model FLOPs utilisation = (6 N + 12 L d s) x tokens/s / peak, N = parameters (all of them, the embedding
  table included), L layers, d width, s = 256 positions; peak = 989e12 bf16 dense FLOP/s (H100 / H200
  datasheet), and beside it the bf16 GEMM rate measured in the same run; loss_chunk_mb large enough that the
  loss keeps the batch's logits (as the ImageNet configs do). Target: MFU >= 40% (compiled: run.compile is
  on by default on CUDA). In the
  rehearsal: size "nano", against the CPU's fp32 GEMM rate measured in the same run (benchmarks.common).

- train_step: benchmarks/bench_train_step.py on the device: one training step of GPT-B (K = 16,384, 256 codes,
  batch 32, bf16 autocast, AdamW) of ours against the lean plain-PyTorch implementation of the same model,
  eager and compiled, each in a fresh process (L and XL: `python benchmarks/bench_train_step.py --sizes L,XL`
  when a lease has the time). Targets: ours >= 1.0x the lean tokens/s with no more
  peak memory; compiled, MFU >= 40% of the measured bf16 GEMM rate.

Timing on CUDA: CUDA events around each call, after warm-up calls, median of the repeats; peak memory =
torch.cuda.max_memory_allocated over the warm-up and timed calls minus torch.cuda.memory_allocated before
them. On the CPU: wall time, and the RSS high-water mark above the RSS before the calls (benchmarks.common).
Ours runs first in each process, then the reference.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine_rate, markdown_table, proc_status_kib, reset_peak_rss  # noqa: E402

BENCHMARKS = ("train_step", "quantizer", "sampling", "loss", "train")  # the GPU check runs them in this order
MODES = ("cuda", "rehearsal")
PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 (datasheet)
GIB = 2**30

# The sizes of each mode: the only thing (with the device) that differs between the GPU check and its rehearsal.
SIZES = {
    "cuda": {
        "quantizer": {"codebook_size": 65536, "dim": 128, "batch": 16, "side": 16, "repeats": 10,
                      "large_search_mib": 256},
        "sampling": {"size": "B", "codebook_size": 16384, "grid": 16, "batch": 32, "guidance": 2.0, "repeats": 3},
        "loss": {"rows": 32 * 256, "dim": 768, "codebook_size": 262144, "chunk_mb": 256.0, "dtype": "bfloat16",
                 "repeats": 5},
        "train": {"size": "B", "codebook_size": 16384, "grid": 16, "batch": 128, "steps": 30, "log_every": 10,
                  "sequences": 4096, "precision": "bf16", "deepspeed": "configs/deepspeed/zero2.yaml",
                  "gemm_size": 8192, "loss_chunk_mb": 8192.0},
        "train_step": {"sizes": "B", "codebook_size": 16384, "grid": 16, "batch": 32, "steps": 10, "warmup": 3,
                       "compile": "B"},
    },
    "rehearsal": {
        "quantizer": {"codebook_size": 8192, "dim": 128, "batch": 4, "side": 16, "repeats": 2,
                      "large_search_mib": 32},
        "sampling": {"size": "nano", "codebook_size": 1024, "grid": 4, "batch": 2, "guidance": 2.0, "repeats": 1},
        "loss": {"rows": 512, "dim": 64, "codebook_size": 16384, "chunk_mb": 4.0, "dtype": "float32", "repeats": 2},
        "train": {"size": "nano", "codebook_size": 1024, "grid": 8, "batch": 4, "steps": 6, "log_every": 2,
                  "sequences": 64, "precision": "bf16", "deepspeed": "configs/deepspeed/zero2.yaml",
                  "gemm_size": 0, "loss_chunk_mb": 256.0},
        "train_step": {"sizes": "nano", "codebook_size": 1024, "grid": 4, "batch": 2, "steps": 2, "warmup": 1,
                       "compile": ""},
    },
}
DEVICES = {"cuda": "cuda", "rehearsal": "cpu"}


# ------------------------------------------------------------------------------------------------ measuring

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Seconds of each of `repeats` calls of fn() after `warmup` calls, their median, and the peak memory of
    all the calls (warm-up included) above what was allocated before them."""
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = proc_status_kib("VmRSS") * 1024
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
    synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else proc_status_kib("VmHWM") * 1024) - base
    return {"times_s": times, "median_s": statistics.median(times), "peak_bytes": int(peak)}


def gemm_flops(device: torch.device, size: int, repeats: int = 10) -> dict:
    """The device's matrix-product rate now: bf16 size^3 on CUDA; on the CPU fp32 2048^3 (common.machine_rate)."""
    return machine_rate(device.type, size, repeats)


def row(metric: str, unit: str, ours: float, reference: float, higher_is_better: bool,
        target: float | None, note: str = "") -> dict:
    """One compared number. ratio = ours' advantage (ours / ref when higher is better, ref / ours when lower
    is); it passes when ratio >= target."""
    ratio = ours / reference if higher_is_better else reference / ours
    return {"metric": metric, "unit": unit, "ours": float(ours), "reference": float(reference),
            "higher_is_better": higher_is_better, "ratio": float(ratio), "target": target,
            "passed": None if target is None else bool(ratio >= target), "note": note}


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------------ benchmarks

def quantizer(device: torch.device, codebook_size: int, dim: int, batch: int, side: int, repeats: int,
              large_search_mib: int) -> dict:
    from stage1_tokenizer.quantizers import SimVQ
    from vector_quantize_pytorch import SimVQ as RefSimVQ

    tokens = batch * side * side
    z = torch.randn(batch, dim, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    z.requires_grad_(True)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(device)

    def step(module, ours: bool):
        def call():
            z.grad = None
            module.zero_grad(set_to_none=True)
            if ours:
                out = module(z)
                quantized, loss = out.quantized, out.loss
            else:
                quantized, _, loss = module(z)
            ((quantized * upstream).sum() + loss).backward()
        return call

    results = {}
    ours = SimVQ(codebook_size, dim).to(device).train()
    results["ours"] = measure(step(ours, True), device, repeats)
    large = SimVQ(codebook_size, dim, search_max_bytes=large_search_mib * 2**20).to(device).train()
    results["ours_large_block"] = measure(step(large, True), device, repeats)
    del ours, large
    torch.manual_seed(0)  # the reference draws its frozen codebook from the global generator
    reference = RefSimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=False, channel_first=True)
    results["reference"] = measure(step(reference.to(device).train(), False), device, repeats)
    rate = {name: tokens / m["median_s"] for name, m in results.items()}
    return {
        "settings": {"codebook_size": codebook_size, "dim": dim, "latents": [batch, dim, side, side],
                     "tokens": tokens, "repeats": repeats, "large_search_mib": large_search_mib},
        "measured": results,
        "rows": [
            row("forward + backward tokens/s", "tokens/s", rate["ours"], rate["reference"], True, 3.0),
            row("forward + backward peak memory", "bytes", results["ours"]["peak_bytes"],
                results["reference"]["peak_bytes"], False, 4.0),
            row(f"tokens/s, ours with a {large_search_mib} MiB search block", "tokens/s",
                rate["ours_large_block"], rate["reference"], True, None),
        ],
    }


def sampling(device: torch.device, size: str, codebook_size: int, grid: int, batch: int, guidance: float,
             repeats: int) -> dict:
    from x_transformers.autoregressive_wrapper import identity

    from benchmarks.bench_sampling import NUM_CLASSES, build_ours, build_reference
    from stage2_generator.config import GeneratorConfig
    from stage2_generator.sampling import generate
    from stage2_generator.config import SamplingConfig

    cfg = GeneratorConfig(size=size, conditioning="class", codebook_size=codebook_size, grid=[grid, grid],
                          num_classes=NUM_CLASSES)
    ours, reference = build_ours(cfg).to(device), build_reference(cfg).to(device)
    compiled = build_ours(cfg).to(device)
    length = cfg.sequence_length
    labels = (torch.arange(batch) % NUM_CLASSES).to(device)
    indices = list(range(batch))
    guided = SamplingConfig(guidance_scale=guidance, seed=0)
    prompts = torch.zeros(2 * batch, 1, dtype=torch.long, device=device)  # the doubled batch guidance runs
    outputs = {}

    def ours_call():
        outputs["ours"] = generate(ours, labels, indices, guided)

    def compiled_call():
        outputs["compiled"] = generate(compiled, labels, indices, replace(guided, compile=True))

    def reference_call():
        outputs["reference"] = reference.generate(prompts, length, temperature=1.0, filter_logits_fn=identity,
                                                  cache_kv=True)

    results = {"ours": measure(ours_call, device, repeats), "reference": measure(reference_call, device, repeats),
               "compiled": measure(compiled_call, device, repeats)}
    assert tuple(outputs["ours"].shape) == (batch, length), tuple(outputs["ours"].shape)
    assert tuple(outputs["reference"].shape) == (2 * batch, length), tuple(outputs["reference"].shape)
    rate = {name: batch * length / m["median_s"] for name, m in results.items()}
    return {
        "settings": {"size": size, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads,
                     "parameters": ours.num_parameters(), "codebook_size": codebook_size, "grid": [grid, grid],
                     "codes": length, "batch": batch, "decoder_rows": 2 * batch, "guidance": guidance,
                     "dtype": "float32", "repeats": repeats},
        "measured": results,
        "rows": [row(f"guided sampling tokens/s (batch {batch}, guidance {guidance:g})", "tokens/s", rate["ours"],
                     rate["reference"], True, 1.5),
                 row("the same, decode step compiled, vs ours eager", "tokens/s", rate["compiled"], rate["ours"], True,
                     None, note=f"compiled and eager codes equal: {torch.equal(outputs['compiled'], outputs['ours'])}")],
    }


def loss(device: torch.device, rows: int, dim: int, codebook_size: int, chunk_mb: float, dtype: str,
         repeats: int) -> dict:
    from benchmarks.bench_generator_loss import inputs
    from stage2_generator.loss import chunk_rows, chunked_cross_entropy

    torch_dtype = getattr(torch, dtype)
    hidden, weight, targets = (t.detach().to(device) for t in inputs(rows, dim, codebook_size))
    hidden = hidden.to(torch_dtype).requires_grad_(True)
    weight = weight.to(torch_dtype).requires_grad_(True)
    per_chunk = chunk_rows(codebook_size, chunk_mb)
    value = {}

    def call(variant: str):
        def run():
            hidden.grad = weight.grad = None  # each call allocates its gradients, as a training step does
            if variant == "chunked":
                out = chunked_cross_entropy(hidden, weight, targets, per_chunk)
            else:
                out = F.cross_entropy((hidden @ weight.T).float(), targets)
            out.backward()
            value[variant] = out.detach()
        return run

    results, kept = {}, {}
    for variant in ("chunked", "naive"):  # ours first
        results[variant] = measure(call(variant), device, repeats)
        kept[variant] = {"loss": float(value[variant]), "grad_hidden": hidden.grad.float().cpu(),
                         "grad_weight": weight.grad.float().cpu()}
        hidden.grad = weight.grad = None

    def relative(name: str) -> float:
        a, b = kept["chunked"][name], kept["naive"][name]
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    agreement = {"loss": abs(kept["chunked"]["loss"] - kept["naive"]["loss"]) / abs(kept["naive"]["loss"]),
                 "grad_hidden": relative("grad_hidden"), "grad_weight": relative("grad_weight")}
    # fp32: rounding only; bf16: the chunk GEMMs round differently and the naive weight gradient is a bf16
    # product where the chunked one accumulates in fp32, so only a gross disagreement (a bug) fails the run
    tolerance = 1e-1 if torch_dtype == torch.bfloat16 else 1e-4
    if not all(math.isfinite(v) and v <= tolerance for v in agreement.values()):
        raise AssertionError(f"chunked and naive losses disagree beyond {tolerance:g} (relative): {agreement}")
    chunked, naive = results["chunked"], results["naive"]
    return {
        "settings": {"rows": rows, "dim": dim, "codebook_size": codebook_size, "chunk_mb": chunk_mb,
                     "chunk_rows": per_chunk, "dtype": dtype, "repeats": repeats,
                     "logits_bytes_fp32": rows * codebook_size * 4},
        "measured": results,
        "agreement_relative": agreement,
        "losses": {k: v["loss"] for k, v in kept.items()},
        "rows": [
            row("forward + backward peak memory", "bytes", chunked["peak_bytes"], naive["peak_bytes"], False, 4.0),
            row("forward + backward time", "s", chunked["median_s"], naive["median_s"], False, 1 / 1.5),
        ],
    }


def train(device: torch.device, size: str, codebook_size: int, grid: int, batch: int, steps: int, log_every: int,
          sequences: int, precision: str, deepspeed: str, gemm_size: int, loss_chunk_mb: float) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # before DeepSpeed is imported
    from benchmarks.bench_cache_loader import build_cache
    from benchmarks.bench_generator_train import throughput
    from benchmarks.common import REPO
    from simvq_common import distributed
    from simvq_common.run_dir import read_metrics
    from stage2_generator.config import (GeneratorConfig, GeneratorDataConfig, GeneratorOptimConfig,
                                         GeneratorRunConfig, GeneratorTrainConfig)
    from stage2_generator.train import GeneratorTrainer

    class ThroughputTrainer(GeneratorTrainer):
        """The real training loop; no checkpoint and no export (GPT-B's would cost more than the steps)."""

        def save(self) -> None:
            pass

        def export(self) -> Path:
            return Path(self.cfg.run.out_dir)

    peak = gemm_flops(device, gemm_size)  # before training: the same clocks the steps run at
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        build_cache(cache, sequences, grid, codebook_size, shards=1)
        cfg = GeneratorTrainConfig(
            model=GeneratorConfig(size=size, conditioning="class"),
            data=GeneratorDataConfig(cache=str(cache), batch_size=batch),
            optim=GeneratorOptimConfig(lr=1e-4, warmup_steps=0),
            run=GeneratorRunConfig(out_dir=str(Path(tmp) / "run"), steps=steps, precision=precision,
                                   deepspeed=str(REPO / deepspeed), log_every=log_every, val_every=10**9,
                                   checkpoint_every=10**9, loss_chunk_mb=loss_chunk_mb))
        trainer = ThroughputTrainer(cfg)
        model_cfg, parameters = trainer.cfg.model, trainer.model.num_parameters()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            trainer.train()
            measured = throughput(read_metrics(Path(tmp) / "run" / "metrics.jsonl"))
            peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            bf16 = trainer.bf16
        finally:
            distributed.shutdown()
    positions = model_cfg.sequence_length  # the prefix token + the first L - 1 codes
    flops_per_token = 6 * parameters + 12 * model_cfg.depth * model_cfg.dim * positions
    achieved = flops_per_token * measured["tokens_per_s"]
    embedding = codebook_size * model_cfg.dim
    if device.type == "cuda":
        reference, reference_label = PEAK_BF16_FLOPS, "989e12 bf16 dense FLOP/s (H100/H200 datasheet)"
    else:
        reference, reference_label = peak["flops"], f"this CPU's measured {peak['what']} (rehearsal)"
    return {
        "settings": {"size": size, "dim": model_cfg.dim, "depth": model_cfg.depth, "heads": model_cfg.heads,
                     "parameters": parameters, "codebook_size": codebook_size, "grid": [grid, grid],
                     "positions": positions, "batch": batch, "tokens_per_step": batch * positions, "steps": steps,
                     "log_every": log_every, "precision": precision, "bf16": bf16, "deepspeed": deepspeed},
        "measured": {**measured, "peak_memory_bytes": peak_memory},
        "mfu": {"formula": "(6 * parameters + 12 * layers * dim * sequence_length) * tokens/s / peak",
                "flops_per_token": flops_per_token, "achieved_flops": achieved, "peak_flops": reference,
                "peak": reference_label, "mfu": achieved / reference,
                "measured_gemm": peak, "mfu_vs_measured_gemm": achieved / peak["flops"],
                "mfu_without_embedding_table": (achieved - 6 * embedding * measured["tokens_per_s"]) / reference},
        "rows": [row("training model FLOP/s (MFU)", "FLOP/s", achieved, reference, True, 0.40,
                     note=f"{measured['tokens_per_s']:,.0f} tokens/s; peak = {reference_label}")],
    }


def train_step(device: torch.device, sizes: str, codebook_size: int, grid: int, batch: int, steps: int,
               warmup: int, compile: str) -> dict:
    from benchmarks.bench_train_step import compare, parse_args

    args = parse_args(["--sizes", sizes, "--codebook-size", str(codebook_size), "--grid", str(grid), "--batch",
                       str(batch), "--steps", str(steps), "--warmup", str(warmup), "--repeats", "1", "--device",
                       device.type] + (["--compile", compile] if compile else []))
    measured = compare(args)
    rows = []
    for s in measured["summary"]:
        label = f"GPT-{s['size']} step{' compiled' if s['compile'] else ''}"
        rows.append(row(f"{label}: tokens/s vs lean", "tokens/s", s["ours"]["tokens_per_s"],
                        s["lean"]["tokens_per_s"], True, 1.0, note=f"max loss difference {s['max_loss_difference']:.1e}"))
        rows.append(row(f"{label}: peak memory vs lean", "bytes", s["ours"]["peak_bytes"], s["lean"]["peak_bytes"],
                        False, 1.0))
        rows.append(row(f"{label}: MFU (ours; lean {s['lean']['mfu']:.1%})", "FLOP/s",
                        s["ours"]["mfu"] * measured["peak_rate"], measured["peak_rate"], True,
                        0.40 if s["compile"] and device.type == "cuda" else None,
                        note=f"vs the measured {measured['gemm_rates'][0]['what']}"))
    return {"settings": {**vars(args), "precision": "bf16 autocast" if device.type == "cuda" else "fp32"},
            "measured": measured, "rows": rows}


FUNCTIONS = {"quantizer": quantizer, "sampling": sampling, "loss": loss, "train": train, "train_step": train_step}


def run(name: str, mode: str) -> dict:
    """Benchmark `name` at `mode`'s sizes on `mode`'s device: settings, raw measurements, compared rows."""
    device = torch.device(DEVICES[mode])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--mode cuda needs a CUDA GPU; use --mode rehearsal on a CPU")
    tic = time.perf_counter()
    result = FUNCTIONS[name](device, **SIZES[mode][name])
    return {"name": name, "mode": mode, "device": device_label(device), **result,
            "seconds": round(time.perf_counter() - tic, 1)}


# ------------------------------------------------------------------------------------------------ printing

def human(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / GIB:,.3f} GiB" if value >= 0.1 * GIB else f"{value / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{value * 1e3:,.1f} ms"
    if unit == "FLOP/s":
        return f"{value / 1e12:,.2f} TFLOP/s" if value >= 1e11 else f"{value / 1e9:,.1f} GFLOP/s"
    return f"{value:,.0f} {unit}"


def ratio_text(r: dict) -> str:
    return f"{r['ratio']:.1%}" if r["unit"] == "FLOP/s" else f"{r['ratio']:.2f}x"


def target_text(r: dict) -> str:
    if r["target"] is None:
        return "-"
    return f">= {r['target']:.0%}" if r["unit"] == "FLOP/s" else f">= {r['target']:.2f}x"


def verdict(r: dict) -> str:
    return "-" if r["passed"] is None else ("pass" if r["passed"] else "MISSED")


def table(results: list[dict]) -> str:
    header = ["benchmark", "metric", "ours", "reference", "ratio (ours' advantage)", "target", "result"]
    rows = []
    for result in results:
        if "error" in result:
            rows.append([result["name"], "(did not run)", "-", "-", "-", "-", "ERROR"])
            continue
        for r in result["rows"]:
            rows.append([result["name"], r["metric"], human(r["ours"], r["unit"]), human(r["reference"], r["unit"]),
                         ratio_text(r), target_text(r), verdict(r)])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", choices=BENCHMARKS, help="the benchmark to run")
    parser.add_argument("--all", action="store_true", help="run all of them in this process, one after another")
    parser.add_argument("--mode", choices=MODES, default="cuda", help="cuda: the GPU check's sizes on the GPU; "
                        "rehearsal: tiny sizes on the CPU")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if not args.bench and not args.all:
        parser.error("give --bench NAME or --all")
    results = [run(name, args.mode) for name in (BENCHMARKS if args.all else [args.bench])]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results if args.all else results[0], indent=2, default=str) + "\n")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
