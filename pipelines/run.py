"""`simvq run`: the whole system from one config, each stage skipped when its inputs are unchanged.

Stages, in order (each an ordinary run of the stage's own job, in a folder of `out_dir`):

    tokenizer        train the SimVQ tokenizer                          tokenizer/ (run dir; tokenizer/tokenizer)
    tokenizer-eval   rFID, PSNR, SSIM, LPIPS, usage on the val split    tokenizer/tokenizer/eval.json
    cache-train      pre-tokenize the train split (with its views)      cache_train/
    cache-train-AUG  the same with a generator's own views (its `aug`)  cache_train_AUG/
    cache-val        pre-tokenize the val split (no views)              cache_val/
    generator-NAME   train each generator on the caches                 generator_NAME/ (run dir; .../generator)
    samples-NAME     samples in the reference's class mix (or balanced)  samples_NAME/
    eval-NAME        FID / sFID / KID / precision-recall against val    samples_NAME/metrics.json
                     (or against `reference`: an ADM reference batch)
    baseline         class-wise unigram codes, decoded, evaluated       baseline/
    ready-made-NAME  a grid of each ready-made generator of `ready_made`    ready_made_NAME/
    report           report.md, report.json, grids, curves (always rebuilt)

A stage's identity is a hash of what determines its output: its config and the fingerprints of the
artifacts it reads. `stages/NAME.json` records the identity when the stage starts and its result when it
ends. A finished stage with the same identity is skipped; an unfinished one is resumed (the trainers and
pre-tokenization resume from their own checkpoints); a stage whose identity changed is started afresh
(its folder removed), and so is everything downstream, because their identities hold its fingerprint.

The FID samples' classes (class_mix): "reference" gives each class the share it has of the val cache (the FID
reference), allocated to fid_samples by largest remainder; the class generators, the baseline and the text
generators' val captions all follow those counts, in the same index -> class order. "balanced" gives the class
generators and the baseline round robin over the classes (for a balanced reference such as ImageNet's).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from simvq_common import distributed
from simvq_common.artifacts import write_kind
from simvq_common.config import canonical_container, load_config, to_yaml
from simvq_common.console import console
from simvq_common.errors import ConfigError
from simvq_common.io import write_json_atomic
from simvq_common.numerics import fix_cublas_workspace
from simvq_common.provenance import command_line
from simvq_common.run_lock import holding_run_dir
from simvq_common.tracking import Tracker, TrackingSettings
from stage1_tokenizer.config import TokenizerEvalConfig, TokenizerTrainConfig
from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train import train_tokenizer
from image_data.emoji import emoji_captions_identity
from stage2_generator.cache_format import AUGMENTATION_VIEWS
from stage2_generator.cache_reader import CodeCache
from stage2_generator.conditionings import conditioning_for
from stage2_generator.config import GeneratorTrainConfig, SamplingConfig
from stage2_generator.model import Generator
from stage2_generator.train import train_generator

from .baseline import baseline_samples
from .conditionings import request_kind
from .conditionings.class_label import ClassRequests
from .conditions import reference_captions, reference_classes
from .config import EvaluateConfig, GeneratorStage, PipelineConfig, PretokenizeConfig, SampleConfig, sampling_with
from .evaluate import evaluate
from .pretokenize import pretokenize
from .report import write_report, write_results_section
from .sample import sample


@dataclass(frozen=True)
class ModelRecord:
    """A trained model stage's result: its directory and fingerprint (what later stages record as input)."""

    path: str
    fingerprint: str


@dataclass(frozen=True)
class CacheRecord:
    """A pre-tokenization stage's result: the cache, its fingerprint and its sequence count."""

    path: str
    fingerprint: str
    sequences: int


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs stages in `out_dir`, skipping finished ones whose identity is unchanged (see the module doc).

    Under torchrun every rank walks the same stages: the distributed jobs (training, pre-tokenization,
    sampling) run on all ranks, the others (`everywhere=False`: evaluation, the baseline) on rank 0's GPU
    while the other ranks wait for its result file, outside any collective that could time out. Rank 0
    alone writes the records and removes stale folders.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.records = out_dir, out_dir / "stages"
        self.timings: dict[str, float] = {}

    def run(self, name: str, identity: dict, folder: Path | None, work: Callable[[], dict],
            everywhere: bool = True) -> dict:
        path, key = self.records / f"{name}.json", identity_hash(identity)
        distributed.barrier()  # rank 0's last record is on disk before anyone reads it
        record = json.loads(path.read_text()) if path.is_file() else None
        if record and record["identity"] == key and "result" in record:
            if distributed.rank() == 0:
                console.print(f"[dim]{name}: unchanged, skipped (identity {key})[/]")
            self.timings[name] = record.get("seconds", 0.0)
            return record["result"]
        if distributed.rank() == 0:
            if record and record["identity"] != key and folder is not None and folder.exists():
                console.print(f"[yellow]{name}[/]: inputs changed ({record['identity']} -> {key}): starting it afresh")
                shutil.rmtree(folder)
            else:
                resuming = record is not None and folder is not None and folder.exists()
                console.print(f"[bold]{name}[/]: {'resuming' if resuming else 'running'}")
            write_json_atomic(path, {"identity": key, "inputs": identity, "started": time.time()})
            self.rank0_record(name).unlink(missing_ok=True)
        distributed.barrier()
        tic = time.time()
        if everywhere:
            result = distributed.broadcast_object(work())
        else:
            result = distributed.run_on_rank0(work, self.rank0_record(name))
        self.timings[name] = round(time.time() - tic, 1)
        if distributed.rank() == 0:
            write_json_atomic(path, {"identity": key, "inputs": identity, "seconds": self.timings[name],
                                     "result": result})
        return result

    def rank0_record(self, name: str) -> Path:
        return self.records / f"{name}.rank0.json"


def training_identity(cfg: TokenizerTrainConfig | GeneratorTrainConfig) -> dict:
    """A training stage's identity: its config, less what does not change its result: where its records are
    mirrored (TensorBoard, W&B) and which signals preempt it. Changing those retrains nothing."""
    config = canonical_container(replace(cfg, run=replace(cfg.run, **asdict(TrackingSettings()))))
    config["run"].pop("preemption_signals")
    return {"config": OmegaConf.to_yaml(config)}


def log_grid(gen_cfg: GeneratorTrainConfig, grid: Path) -> None:
    """The samples' grid into the generator's run directory (TensorBoard, and W&B when it is on), at the run's
    last step: beside its training curves and the tokenizer's reconstructions. The pipeline does it because it
    decodes the codes; the generator's trainer knows no tokenizer."""
    if distributed.rank() == 0 and grid.is_file():
        with Tracker(gen_cfg.run.out_dir, TrackingSettings.of(gen_cfg.run), kind="generator-run", config=gen_cfg,
                     purge_stale=False) as tracker:  # adds to a finished run: its last step's scalars stay
            tracker.image("samples", grid, gen_cfg.run.steps)


def tokenizer_config(cfg: PipelineConfig) -> TokenizerTrainConfig:
    out = Path(cfg.out_dir) / "tokenizer"
    tok = load_config(TokenizerTrainConfig, cfg.tokenizer, [*cfg.tokenizer_overrides, f"run.out_dir={out}"])
    if tok.data.source != cfg.data or tok.data.resolution != cfg.resolution:
        tok = replace(tok, data=replace(tok.data, source=cfg.data, resolution=cfg.resolution))
    return tok


def train_cache_key(cfg: PipelineConfig, aug: str) -> str:
    """The train cache with these views: "train" (cache_train/) with the run's own, "train_AUG" else."""
    return "train" if aug == cfg.aug else f"train_{aug}"


def stage_views(cfg: PipelineConfig, stage: GeneratorStage) -> str:
    """The views of a generator stage's train cache: its own `aug`, or the run's."""
    return stage.aug or cfg.aug


def generator_config(cfg: PipelineConfig, stage: GeneratorStage) -> GeneratorTrainConfig:
    out = Path(cfg.out_dir)
    return load_config(GeneratorTrainConfig, stage.config, [
        *stage.overrides, f"data.cache={out / f'cache_{train_cache_key(cfg, stage_views(cfg, stage))}'}",
        f"data.val_cache={out / 'cache_val'}", f"run.out_dir={out / f'generator_{stage.name}'}"])


def tokenizer_eval_config(cfg: PipelineConfig, tokenizer_dir: str) -> TokenizerEvalConfig:
    """The tokenizer-eval stage's job: the run's val split, its first max_reference images (as the eval stages)."""
    return TokenizerEvalConfig(tokenizer=tokenizer_dir, data=cfg.data, split="val", resolution=cfg.resolution,
                               perceptual=cfg.eval_perceptual, fid_source=cfg.fid_source,
                               max_images=cfg.max_reference)


def tokenizer_job_identity(job: TokenizerEvalConfig | PretokenizeConfig, tokenizer_fingerprint: str) -> dict:
    """Every field of a job that reads the tokenizer, but where it runs and writes; the tokenizer by its fingerprint;
    an emoji text cache's captions by their hash. All the rest by default: a field added to the job joins it."""
    fields = {k: v for k, v in asdict(job).items() if k not in ("tokenizer", "out", "device")}
    if isinstance(job, PretokenizeConfig) and job.text_embeddings and job.data == "emoji":  # they changed once
        fields["captions"] = emoji_captions_identity()
    return {"tokenizer": tokenizer_fingerprint, **fields}


def samples_hash(npz: Path) -> str:
    """The samples' identity: their pixels (an .npz file's bytes also hold zip timestamps)."""
    with np.load(npz, allow_pickle=False) as data:
        return hashlib.sha256(np.ascontiguousarray(data["arr_0"]).tobytes()).hexdigest()[:16]


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage of `cfg` in cfg.out_dir, which it holds alone (see the module doc)."""
    cfg = replace(cfg, command=cfg.command or command_line())
    device = distributed.setup()  # one process group for every stage when launched by torchrun
    with holding_run_dir(cfg.out_dir, "simvq run"):
        return _run_pipeline(cfg, device)


def generator_stages(cfg: PipelineConfig) -> tuple[dict[str, GeneratorTrainConfig], dict[str, SamplingConfig]]:
    """Each generator stage's training config and sampler, checked before anything trains or is written."""
    names = [g.name for g in cfg.generators]
    if len(set(names)) != len(names):
        raise ConfigError(f"generator names must be unique, got {names}")
    if cfg.class_mix not in ("reference", "balanced"):
        raise ConfigError(f"class_mix={cfg.class_mix!r}: expected 'reference' (the val split's class histogram) or "
                          f"'balanced' (round robin over the classes)")
    for where, aug in [("aug", cfg.aug), *((f"generator {g.name}: aug", g.aug) for g in cfg.generators if g.aug)]:
        if aug not in AUGMENTATION_VIEWS:
            raise ConfigError(f"{where}={aug!r}: expected one of {sorted(AUGMENTATION_VIEWS)} (a generator stage "
                              f"without one takes the run's aug)")
    gen_cfgs, samplings = {g.name: generator_config(cfg, g) for g in cfg.generators}, {}
    for g in cfg.generators:
        try:
            samplings[g.name] = sampling_with(cfg.sampling, " ".join(g.sampling))
            samplings[g.name].check(conditioning_for(gen_cfgs[g.name].model).conditional)
        except ConfigError as error:
            raise ConfigError(f"generator {g.name}: sampling {g.sampling}: {error}") from None
    return gen_cfgs, samplings


def _run_pipeline(cfg: PipelineConfig, device: torch.device) -> dict:
    out = Path(cfg.out_dir)
    tok_cfg = tokenizer_config(cfg)
    gen_cfgs, samplings = generator_stages(cfg)
    if distributed.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_kind(out, "pipeline-run")
        (out / "config.yaml").write_text(to_yaml(cfg))
    stages = Stages(out)
    if tok_cfg.run.deterministic or any(c.run.deterministic for c in gen_cfgs.values()):
        fix_cublas_workspace()  # before this process's first GPU matmul, whichever stage asks

    # stage 1: the tokenizer and its reconstruction metrics (the floor under every generator's FID)

    tok = ModelRecord(**stages.run("tokenizer", training_identity(tok_cfg), out / "tokenizer",
                                   partial(trained_tokenizer, tok_cfg)))
    tok_eval_cfg = tokenizer_eval_config(cfg, tok.path)
    tok_eval = stages.run("tokenizer-eval", tokenizer_job_identity(tok_eval_cfg, tok.fingerprint), None,
                          partial(evaluate_tokenizer, tok_eval_cfg), everywhere=False)

    # pre-tokenization: a train cache with the run's views (the baseline's) and one per other views a generator
    # asks for; text embeddings in those a text generator reads
    reads_text = {g.name: conditioning_for(gen_cfgs[g.name].model).needs_text for g in cfg.generators}
    views = {g.name: stage_views(cfg, g) for g in cfg.generators}
    jobs = {train_cache_key(cfg, aug): ("train", aug, any(reads_text[n] for n, a in views.items() if a == aug))
            for aug in [cfg.aug, *views.values()]}
    jobs["val"] = ("val", "none", any(reads_text.values()))
    caches: dict[str, CacheRecord] = {}
    for key, (split, aug, text) in jobs.items():
        cache_cfg = PretokenizeConfig(tokenizer=tok.path, data=cfg.data, split=split, resolution=cfg.resolution,
                                      out=str(out / f"cache_{key}"), aug=aug, text_embeddings=text,
                                      max_images=cfg.max_images if split == "train" else cfg.max_reference,
                                      batch_size=cfg.pretokenize_batch_size, num_workers=0, text=cfg.text)
        caches[key] = CacheRecord(**stages.run(f"cache-{key.replace('_', '-')}", tokenizer_job_identity(
            cache_cfg, tok.fingerprint), out / f"cache_{key}", partial(pretokenized, cache_cfg)))
    fid_samples = cfg.fid_samples or caches["val"].sequences  # as many as the reference has images
    val_labels, reference_counts = reference_classes(caches["val"].path, caches["train"].path)
    eval_base = dict(reference=cfg.reference or cfg.data, reference_split="val", max_reference=cfg.max_reference,
                     metrics=list(cfg.metrics), fid_source=cfg.fid_source)

    def evaluated(name: str, samples: dict) -> dict:
        npz = Path(samples["path"]) / "samples.npz"
        key = distributed.rank0_decides(lambda: samples_hash(npz))  # one rank reads the ~10 GB of pixels
        return stages.run(f"eval-{name}", {"samples": key, **eval_base}, None,
                          partial(evaluate, EvaluateConfig(samples=str(npz), **eval_base)), everywhere=False)

    # stage 2: each generator, its samples and their metrics
    generators = {}
    for stage in cfg.generators:
        gen_cfg, sampling = gen_cfgs[stage.name], samplings[stage.name]
        train_cache = caches[train_cache_key(cfg, stage_views(cfg, stage))]
        gen = ModelRecord(**stages.run(
            f"generator-{stage.name}",
            {**training_identity(gen_cfg), "cache_train": train_cache.fingerprint,
             "cache_val": caches["val"].fingerprint},
            Path(gen_cfg.run.out_dir), partial(trained_generator, gen_cfg)))
        # a text generator's FID samples are conditioned on the val cache's captions
        kind = request_kind(gen_cfg.model)
        captions = {"captions": caches["val"].fingerprint} if kind.fid_on_captions else {}
        plan = kind.fid_plan(cfg.class_mix, reference_counts, fid_samples)
        samples = stages.run(
            f"samples-{stage.name}",
            {"generator": gen.fingerprint, "sampling": asdict(sampling), "num": fid_samples,
             "grid_per_class": cfg.grid_per_class, "prompts": stage.prompts, **plan, **captions},
            out / f"samples_{stage.name}",
            partial(sample_generator, cfg, gen.path, gen_cfg, stage, sampling, fid_samples, plan,
                    out / f"samples_{stage.name}", caches["val"].path, val_labels))
        generators[stage.name] = {"generator": asdict(gen), "samples": samples, "metrics": evaluated(stage.name, samples),
                                  "run_dir": gen_cfg.run.out_dir, "conditioning": gen_cfg.model.conditioning,
                                  "size": gen_cfg.model.size, "steps": gen_cfg.run.steps, "sampling": asdict(sampling)}

    baseline = None
    if cfg.baseline:  # the classes a class generator's samples have, whether or not the run trains one
        plan = ClassRequests().fid_plan(cfg.class_mix, reference_counts, fid_samples)
        samples = stages.run(
            "baseline", {"tokenizer": tok.fingerprint, "cache": caches["train"].fingerprint,
                         "num": fid_samples, "seed": cfg.sampling.seed, **plan}, out / "baseline",
            partial(baseline_samples, tok.path, caches["train"].path, plan, fid_samples, cfg.sampling.seed,
                    out / "baseline", device), everywhere=False)
        baseline = {"samples": samples, "metrics": evaluated("baseline", samples)}

    # the ready-made models' grids, for the report to show beside the run's own
    prompts = next((g.prompts for g in cfg.generators
                    if "prompts" in request_kind(gen_cfgs[g.name].model).selects), [])
    ready_made = {name: stages.run(f"ready-made-{name}", {"generator": Generator.from_pretrained(name).fingerprint(),
                                                         "per_class": cfg.grid_per_class, "prompts": prompts},
                                   out / f"ready_made_{name}",
                                   partial(ready_made_grid, cfg, name, prompts, out / f"ready_made_{name}"))
                  for name in cfg.ready_made}

    result = {"config": asdict(cfg),
              "tokenizer": {**asdict(tok), "eval": tok_eval, "run_dir": str(out / "tokenizer")},
              "caches": {split: asdict(record) for split, record in caches.items()}, "reference_class_counts": reference_counts, "generators": generators,
              "baseline": baseline, "ready_made": ready_made, "timings": stages.timings}
    if distributed.rank() == 0:
        reported = write_report(out, result)
        if cfg.results_md:
            write_results_section(cfg.results_md, out, reported)
        console.print(f"[green]done[/]: {out / 'report.md'}")
    distributed.barrier()
    return result


def trained_tokenizer(cfg) -> dict:
    path = train_tokenizer(cfg)
    return asdict(ModelRecord(str(path), Tokenizer.from_pretrained(path).fingerprint()))


def pretokenized(cfg: PretokenizeConfig) -> dict:
    path = pretokenize(cfg)
    cache = CodeCache(cfg.out)
    return asdict(CacheRecord(str(path), cache.fingerprint, len(cache)))


def trained_generator(cfg: GeneratorTrainConfig) -> dict:
    path = train_generator(cfg)
    return asdict(ModelRecord(str(path), Generator.from_pretrained(path).fingerprint()))


def sample_generator(cfg: PipelineConfig, generator: str, gen_cfg: GeneratorTrainConfig, stage: GeneratorStage,
                     sampling: SamplingConfig, num: int, plan: dict, folder: Path, val_cache: str,
                     val_labels: np.ndarray) -> dict:
    """FID samples (classes as `plan` says, or val captions in the reference's class mix for text) plus the
    report's grid samples."""
    common = dict(generator=generator, batch_size=cfg.sample_batch_size, sampling=sampling, save_pngs=False)

    def captions() -> list[str]:  # the val captions (emoji names, or an image folder's class names), in the mix
        return reference_captions(CodeCache(val_cache), val_labels, plan["class_counts"])
    fid_request, grid_request = request_kind(gen_cfg.model).pipeline_requests(num, plan, cfg.grid_per_class,
                                                                              stage.prompts, captions)
    fid = sample(SampleConfig(out=str(folder), **fid_request, **common))
    grid = grid_request and sample(SampleConfig(out=str(folder / "grid"), first_index=num, **grid_request, **common))
    grid_png = folder / "grid" / "grid.png" if grid else folder / "grid.png"
    log_grid(gen_cfg, grid_png)
    return {"path": str(folder), "num": num, "grid": str(grid_png), **plan, "summary": fid}


def ready_made_grid(cfg: PipelineConfig, name: str, prompts: list[str], folder: Path) -> dict:
    """A ready-made generator's grid at its recommended sampler settings: a row per class, or per prompt."""
    model_cfg = Generator.from_pretrained(name).config
    conditioning = model_cfg.conditioning
    request = request_kind(model_cfg).grid_request(name, cfg.grid_per_class, prompts)
    summary = sample(SampleConfig(generator=name, out=str(folder), batch_size=cfg.sample_batch_size,
                                  save_pngs=False, **request))
    sampling = json.loads((folder / "sampling.json").read_text())["config"]["sampling"]
    return {"path": str(folder), "grid": str(folder / "grid.png"), "conditioning": conditioning,
            "sampling": sampling, "summary": summary}
