"""The GPU check's plan: its steps in the order one lease should run them, most informative first.

    smoke       does it run at all: the imports and the device, one step of each trainer (the tokenizer
                compiled; the generator at ZeRO-2 and ZeRO-3, eager and compiled), one guided sampling call
    stages      every stage of the system small (scripts/gpu_check_stages.py), compiled where the check is
                about compile (the tokenizer, the class generator at ZeRO-2 and at ZeRO-3), eager elsewhere
    benchmarks  benchmarks/bench_gpu.py, one process each, the most informative first

`min_s` is about what a step takes on the GPU (an estimate until a lease measures it): the driver starts no step
when its deadline leaves less. `limit_s` is the most a step may take, so that one slow step cannot starve the
rest. `select` keeps the steps `--only` names (step or phase names) and every step they need.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gpu_check_stages import TINY_GENERATOR, Mode, Stage, build_stages, finite_losses

REPO = Path(__file__).resolve().parents[1]
PHASES = ("smoke", "stages", "benchmarks")

# Seconds a step takes on one H100 / H200: estimates from the CPU rehearsal and the model sizes, to be replaced
# by the first lease's measured seconds (docs/BENCHMARKS.md). Unlisted steps: 30.
ESTIMATES_S = {
    "smoke-imports": 15, "smoke-tokenizer": 45, "smoke-cache": 15, "smoke-generator-zero2": 25,
    "smoke-generator-zero2-compiled": 40, "smoke-generator-zero3": 25, "smoke-generator-zero3-compiled": 45,
    "smoke-sample": 15, "fid-standin": 5, "tokenizer": 60, "text-caches": 5, "generator-class-zero2": 50,
    "generator-class-zero3": 55, "pipeline": 60, "bench-train_step": 150, "bench-quantizer": 30,
    "bench-sampling": 40, "bench-loss": 25, "bench-train": 90,
}
LIMITS_S = {"bench-train_step": 240, "bench-train": 150}  # the rest: the mode's timeout_s


def build_smoke(mode: Mode, work: Path) -> list[Stage]:
    python = sys.executable
    cli = [python, "-m", "pipelines.cli"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "pipelines.cli"]
    smoke = work / "smoke"
    tok_dir, cache = smoke / "tokenizer", smoke / "cache"

    def check_imports(output: str):
        lines = [line for line in output.splitlines() if line.startswith(("torch ", "bf16 ", "imported "))]
        saw = next((line for line in lines if line.startswith("bf16 ")), "")
        problems = [] if f"on {mode.device}: finite=True" in saw else [f"no finite bf16 matmul on {mode.device}"]
        return problems, lines

    steps = [Stage("smoke-imports", "import every module the check needs; torch, CUDA and GPU names; a bf16 "
                   "matmul on the device", command=[python, str(REPO / "scripts" / "gpu_check_imports.py")],
                   check=check_imports, phase="smoke")]

    def check_tokenizer(output: str):
        problems = finite_losses(tok_dir)
        if not (tok_dir / "tokenizer" / "config.yaml").is_file():
            problems.append(f"{tok_dir / 'tokenizer'} was not exported")
        return problems, []

    compiled = "compiled" if mode.compile == "true" else "compile off in the rehearsal"
    steps.append(Stage("smoke-tokenizer", f"one step of train-tokenizer under torchrun (bf16, {compiled}, with the "
                       "GAN step)", command=[*torchrun, "train-tokenizer", "-c", "configs/tokenizer/gpu_check_tiny.yaml",
                                             f"run.out_dir={tok_dir}", "run.precision=bf16", "loss.perceptual=none",
                                             f"run.compile={mode.compile}", "run.steps=1", "data.batch_size=8",
                                             "loss.gan_start_step=0", "run.log_every=1", "run.image_every=1",
                                             "run.checkpoint_every=1"],
                       check=check_tokenizer, phase="smoke"))
    steps.append(Stage("smoke-cache", "pre-tokenize 32 images with that tokenizer",
                       command=[*cli, "pretokenize", "--tokenizer", str(tok_dir / "tokenizer"), "--data", "emoji",
                                "--out", str(cache), "resolution=32", "num_workers=0", "max_images=32",
                                "batch_size=32"],
                       needs=("smoke-tokenizer",), phase="smoke"))
    for zero in (2, 3):
        for compiled in (False, True):
            name = f"smoke-generator-zero{zero}" + ("-compiled" if compiled else "")
            run_dir = smoke / name

            def check_generator(output: str, run_dir=run_dir):
                problems = finite_losses(run_dir)
                if not (run_dir / "generator" / "model.safetensors").is_file():
                    problems.append(f"{run_dir / 'generator'} was not exported")
                return problems, []

            steps.append(Stage(name, f"one step of train-generator under torchrun (bf16, ZeRO-{zero}"
                               + (f", {mode.compile == 'true' and 'compiled' or 'compile off in the rehearsal'})"
                                  if compiled else ", eager)"),
                               command=[*torchrun, "train-generator", "-c", "configs/generator/gpu_check_class.yaml",
                                        f"data.cache={cache}", "data.val_cache=''", f"run.out_dir={run_dir}",
                                        f"run.deepspeed=configs/deepspeed/zero{zero}.yaml", "run.precision=bf16",
                                        f"run.compile={mode.compile if compiled else 'false'}", *TINY_GENERATOR,
                                        "run.steps=1"],
                               needs=("smoke-cache",), check=check_generator, phase="smoke"))

    samples = smoke / "samples"

    def check_sample(output: str):
        meta = json.loads((samples / "sampling.json").read_text())
        scale = meta["config"]["sampling"]["guidance_scale"]
        return ([] if scale == 2.0 else [f"guidance_scale {scale} in sampling.json"]), ["guidance 2, decoded"]

    steps.append(Stage("smoke-sample", "one guided sampling call (guidance 2), decoded by the smoke tokenizer",
                       command=[*cli, "sample", "--generator", str(smoke / "smoke-generator-zero2" / "generator"),
                                "--out", str(samples), "sampling.guidance_scale=2.0", "per_class=1", "batch_size=9"],
                       needs=("smoke-generator-zero2",), check=check_sample, phase="smoke"))
    return steps


def build_benchmarks(mode: Mode, work: Path, results: dict) -> list[Stage]:
    """One step per benchmark of benchmarks/bench_gpu.py, in its order; each result lands in `results`."""
    from benchmarks.bench_gpu import BENCHMARKS

    steps = []
    for name in BENCHMARKS:
        path = work / "benchmarks" / f"{name}.json"

        def check(output: str, name=name, path=path):
            if not path.is_file():
                return [f"{path} was not written"], []
            result = json.loads(path.read_text())
            bad = sorted({r["metric"] for r in result["rows"] for v in (r["ours"], r["reference"])
                          if not (math.isfinite(v) and v > 0)})
            results[name] = result
            return ([f"non-positive or non-finite numbers: {bad}"] if bad else []), []

        steps.append(Stage(f"bench-{name}", f"benchmarks/bench_gpu.py --bench {name}",
                           command=[sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--bench", name,
                                    "--mode", mode.name, "--json", str(path)],
                           check=check, phase="benchmarks"))
    return steps


def build_plan(mode: Mode, work: Path, standin: dict, bench_results: dict) -> list[Stage]:
    steps = [*build_smoke(mode, work), *build_stages(mode, work, standin), *build_benchmarks(mode, work, bench_results)]
    for step in steps:
        step.min_s = ESTIMATES_S.get(step.name, 30) if mode.device == "cuda" else 0
        step.limit_s = LIMITS_S.get(step.name, mode.timeout_s)
    return steps


def select(steps: list[Stage], only: list[str]) -> list[Stage]:
    """The steps named in `only` (step or phase names; empty = all) and every step they need, in plan order."""
    if not only:
        return steps
    by_name = {s.name: s for s in steps}
    unknown = [n for n in only if n not in by_name and n not in PHASES]
    if unknown:
        raise SystemExit(f"--only: no step or phase {unknown}; steps: {', '.join(by_name)}; phases: "
                         f"{', '.join(PHASES)}")
    wanted = {s.name for s in steps if s.name in only or s.phase in only}
    pending = list(wanted)
    while pending:
        for need in by_name[pending.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                pending.append(need)
    return [s for s in steps if s.name in wanted]
