"""The GPU check's report: the machine it ran on, and its markdown section (written into the output folder after
every step, and into docs/BENCHMARKS.md by `scripts/gpu_check.py --publish`)."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
from pathlib import Path

import torch

from benchmarks import bench_gpu
from benchmarks.common import markdown_table
from gpu_check_stages import PERCEPTUAL_NOTE, STANDIN_NOTE, TEXT_NOTE, Mode

PACKAGES = ("deepspeed", "x-transformers", "vector-quantize-pytorch", "torch-fidelity", "omegaconf")


def environment(mode: Mode, argv: list[str]) -> dict:
    from simvq_common.provenance import cpu_model, git_revision, package_version

    cpu = cpu_model()
    info = {"mode": mode.name, "command": shlex.join(["python", "scripts/gpu_check.py", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_revision(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "cpu": cpu, "cpu_count": os.cpu_count(),
            "packages": {p: package_version(p) for p in PACKAGES}}
    if mode.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    else:
        info["gpu"] = None
    return info


def bench_settings(result: dict) -> str:
    s = result["settings"]
    name = result["name"]
    if name == "quantizer":
        return (f"K = {s['codebook_size']:,}, d = {s['dim']}, latents {tuple(s['latents'])} = {s['tokens']:,} "
                f"tokens, forward + backward, median of {s['repeats']}; reference vector-quantize-pytorch SimVQ "
                f"(rotation_trick=False, channel_first=True)")
    if name == "sampling":
        return (f"size {s['size']} ({s['parameters']:,} parameters), K = {s['codebook_size']:,}, {s['codes']} codes, "
                f"batch {s['batch']}, guidance {s['guidance']:g} ({s['decoder_rows']} decoder rows), fp32; reference "
                f"x-transformers AutoregressiveWrapper.generate(cache_kv=True) on the same {s['decoder_rows']} rows "
                f"(it has no guidance), median of {s['repeats']}")
    if name == "loss":
        a = result["agreement_relative"]
        return (f"N = {s['rows']:,} positions, d = {s['dim']}, K = {s['codebook_size']:,}, {s['dtype']}, chunks of "
                f"{s['chunk_rows']} rows ({s['chunk_mb']:g} MiB of fp32 logits); reference "
                f"F.cross_entropy((hidden @ W.T).float()); agreement (relative max) loss {a['loss']:.1e}, "
                f"grads {a['grad_hidden']:.1e} / {a['grad_weight']:.1e}")
    if name == "train_step":
        return (f"sizes {s['sizes']}, K = {s['codebook_size']:,}, {s['grid']}x{s['grid']} codes, batch {s['batch']}, "
                f"{s['precision']}, AdamW, {s['steps']} timed steps after {s['warmup']}, each variant in a fresh "
                f"process; reference the lean plain-PyTorch model of benchmarks/lean_generator.py with the same "
                f"weights; MFU against the {result['measured']['gemm_rates'][0]['what']} measured in this run")
    m = result["mfu"]
    return (f"size {s['size']} ({s['parameters']:,} parameters, {s['depth']} layers, width {s['dim']}), "
            f"K = {s['codebook_size']:,}, {s['positions']} positions, batch {s['batch']}, {s['steps']} steps "
            f"(logged every {s['log_every']}; the first window is warm-up), {s['precision']}, "
            f"{Path(s['deepspeed']).stem}, one device, GeneratorTrainer; "
            f"{result['measured']['tokens_per_s']:,.0f} tokens/s; MFU = {m['formula']}, peak = {m['peak']}; "
            f"against the {m['measured_gemm']['what']} measured in this run ({m['measured_gemm']['flops'] / 1e12:.2f} "
            f"TFLOP/s): {m['mfu_vs_measured_gemm']:.1%}; without the embedding table in N: "
            f"{m['mfu_without_embedding_table']:.1%}")


def step_result(s: dict) -> str:
    if s["status"] == "not started":
        return "not started (" + "; ".join(s["problems"]) + ")"
    return s["status"] + (f" ({'; '.join(s['problems'])})" if s["problems"] else "")


def section(result: dict) -> str:
    env, mode = result["environment"], result["mode"]
    rehearsal = mode == "rehearsal"
    steps = result["steps"]
    passed = sum(s["status"] == "passed" for s in steps)
    title = ("## GPU check, CPU rehearsal" if rehearsal else "## GPU check")
    where = (f"CPU rehearsal on {env['cpu']} ({env['cpu_count']} cores), CUDA hidden: tiny sizes; its numbers "
             f"show that the code runs, they are not GPU results" if rehearsal
             else f"{env['gpu']} ({env['gpu_memory_gib']} GiB, compute capability {env['gpu_capability']})")
    pk = env["packages"]
    running = result.get("running")
    lines = [
        title, "",
        f"Command: `{env['command']}` ({env['date']}, git {env['git']}); {where}; torch {env['torch']}, CUDA "
        f"{env['cuda_runtime']}, Python {env['python']}, DeepSpeed {pk['deepspeed']}, x-transformers "
        f"{pk['x-transformers']}, vector-quantize-pytorch {pk['vector-quantize-pytorch']}, torch-fidelity "
        f"{pk['torch-fidelity']}. Deadline {result['deadline_s']} s; {result['seconds']:.0f} s used. Raw numbers: "
        f"`gpu_check.json`; every step's log: `logs.tar.gz`.", "",
        *([] if result["complete"] else [
            "**Incomplete**: written after " + f"{len(steps)} step(s)"
            + (f", while `{running['name']}` was running (stopped {result.get('stopped', 'before its end')})"
               if running else "") + ".", ""]),
        f"Steps: smoke (does it run at all), stages (every stage small, each a subprocess of the real CLI, training "
        f"under torchrun, checked beyond its exit status: finite losses, the device the job saw, bf16 and the ZeRO "
        f"stage, complete caches, sample counts, the stand-in's weights in the metrics), benchmarks (each in a "
        f"process of its own). **{passed} of {len(steps)} passed.**", "",
        markdown_table(["phase", "step", "what", "result", "seconds", "notes"],
                       [[s["phase"], f"`{s['name']}`", s["what"], step_result(s), f"{s['seconds']:.1f}",
                         "; ".join(n for n in s["notes"] if n not in (STANDIN_NOTE, PERCEPTUAL_NOTE, TEXT_NOTE))]
                        for s in steps]), "",
        f"- {PERCEPTUAL_NOTE}.", f"- {TEXT_NOTE}.", f"- {STANDIN_NOTE}.", "",
    ]
    benchmarks = result["benchmarks"]
    if benchmarks:
        lines += [
            "Benchmarks (`benchmarks/bench_gpu.py`, ours and then the reference in the same process; "
            + ("wall time and RSS peaks on the CPU" if rehearsal else
               "CUDA events, peak = torch.cuda.max_memory_allocated above the memory before") +
            "); ratio = ours' advantage (ours / reference for rates, reference / ours for time and memory; for "
            "training, achieved / peak FLOP/s = MFU):", "", bench_gpu.table(benchmarks), ""]
        if rehearsal:
            lines += ["The targets are the GPU check's; at the rehearsal's tiny sizes on a CPU a missed one means "
                      "nothing.", ""]
        lines += [f"- `{b['name']}`: " + (f"did not run ({b['error']})." if "error" in b else f"{bench_settings(b)}.")
                  for b in benchmarks]
    return "\n".join(lines)
