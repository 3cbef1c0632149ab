"""What a fully used codebook gives the generator: the same class generator over each tokenizer's codes.

    simvq generation-study -c configs/study/generation_emoji.yaml

For each tokenizer (quantizer kind, codebook size, seed: a run of the tokenizer comparison, reused when present and
trained when not) the study evaluates it on the val split (rFID: the floor), pre-tokenizes the data (train and val),
trains the same class-conditional generator once per generator seed (one config, steps, batch and learning rate for
all), samples each with the same settings in the val split's class mix and evaluates the samples against the val
split. Every step writes an ordinary command's output under OUT/<tokenizer>/ (its caches; each generator in
generator_seed<S>_<hash of its training config>/ with its samples/ and sweep rows) and is reused when its inputs are
unchanged, so a killed study continues where it stopped (a generator's training resumes from its checkpoint).

Per generator it records FID, sFID, precision / recall, the gap FID - rFID, the val loss in bits per image (what
modelling that tokenizer's codes costs) and per code as a perplexity against K, the share of the codebook the samples
use against the share real val images use, and training / sampling tokens per second (the output layer's cost).
The sampler sweep measures chosen tokenizers' first generators over other sampler settings: a large vocabulary may
need another sampler than a small one, so the best of each is reported, not one setting for all.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from simvq_common.config import canonical_container, load_config
from simvq_common.console import console
from simvq_common.errors import ConfigError
from simvq_common.io import write_json_atomic
from simvq_common.markdown import write_section
from simvq_common.provenance import command_line, environment
from stage1_tokenizer.config import TokenizerEvalConfig
from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.quantizers import QUANTIZERS
from stage1_tokenizer.train import train_tokenizer
from stage2_generator.cache_reader import CodeCache
from stage2_generator.config import GeneratorTrainConfig, SamplingConfig
from stage2_generator.model import Generator
from stage2_generator.train import train_generator
from studies.config import TokenizerComparisonConfig
from studies.tokenizer_comparison import run_config, run_name

from .conditions import largest_remainder, reference_classes
from .config import (EvaluateConfig, GenerationStudyConfig, PretokenizeConfig, SampleConfig, StudyTokenizer,
                     sampling_with)
from .evaluate import evaluate
from .pretokenize import pretokenize
from .run import identity_hash
from .sample import sample


def reused(path: Path, key: dict, make) -> dict:
    """The record at `path` when it was made from the same `key`, else make()'s, written there with the key."""
    digest = identity_hash(key)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == digest:
            return saved["record"]
    record = make()
    write_json_atomic(path, {"key": digest, "inputs": key, "record": record})
    return record


def code_share(codes: np.ndarray, codebook_size: int) -> float:
    """The share of the codebook that occurs at least once in `codes`."""
    return len(np.unique(codes)) / codebook_size


def train_log(run_dir: Path) -> tuple[float | None, float | None]:
    """(the last logged val loss in nats per code, training tokens/s) of a generator run. The speed is the median
    over the log intervals after the first (warm-up): an interval slowed by a neighbouring job or a paused,
    resumed or preempted run does not move it, as it would move total tokens over total time."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r["val_loss"] for r in lines if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    speed = speed[1:] or speed
    return (val[-1] if val else None), (float(np.median(speed)) if speed else None)


class GenerationStudy:
    """The study's shared facts (tokenizer comparison, reference class mix) and the measuring of one tokenizer."""

    def __init__(self, cfg: GenerationStudyConfig) -> None:
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.comparison = load_config(TokenizerComparisonConfig, cfg.tokenizer_study)
        if not cfg.tokenizers or not cfg.generator_seeds:
            raise ConfigError("the study needs at least one entry in tokenizers and in generator_seeds")
        unknown = sorted({t.kind for t in cfg.tokenizers} - set(QUANTIZERS))
        if unknown:
            raise ConfigError(f"tokenizers: unknown quantizer kind(s) {unknown}: expected one of {sorted(QUANTIZERS)}")
        names = [self.name(t) for t in cfg.tokenizers]
        if len(set(names)) < len(names):
            raise ConfigError(f"tokenizers lists one tokenizer twice ({names}): each needs its own kind, size or seed")
        missing = sorted(set(cfg.sweep_tokenizers) - set(names))
        if missing:
            raise ConfigError(f"sweep_tokenizers {missing} are not among the study's tokenizers {names}")
        if "fid" not in cfg.metrics:
            raise ConfigError(f"metrics={cfg.metrics}: the study compares FIDs; add fid")
        self.sweep = [sampling_with(cfg.sampling, setting) for setting in cfg.sweep]  # a bad key fails here, early

    @staticmethod
    def name(t: StudyTokenizer) -> str:
        return run_name(t.kind, t.codebook_size, t.seed)

    def tokenizer(self, t: StudyTokenizer) -> dict:
        """Train (or reuse) the tokenizer, evaluate it on val and pre-tokenize both splits."""
        train_cfg = run_config(self.comparison, t.kind, t.codebook_size, t.seed)
        data, resolution = train_cfg.data.source, train_cfg.data.resolution
        tokenizer_dir = str(train_tokenizer(train_cfg))
        fingerprint = Tokenizer.from_pretrained(tokenizer_dir).fingerprint()
        folder = self.out / self.name(t)
        eval_cfg = TokenizerEvalConfig(tokenizer=tokenizer_dir, data=data, split="val", resolution=resolution,
                                       max_images=self.cfg.max_reference, perceptual="none",
                                       fid_source=self.cfg.fid_source, out=str(folder / "tokenizer_eval.json"))
        rfid = reused(folder / "tokenizer_eval.record.json", {"tokenizer": fingerprint, **asdict(eval_cfg)},
                      lambda: {k: evaluate_tokenizer(eval_cfg)[k] for k in ("rfid", "psnr", "utilisation")})
        caches = {}
        # val as evaluated: its first max_reference images, so the samples' class mix is the reference's
        for split, aug, max_images in (("train", self.cfg.aug, self.cfg.max_images),
                                       ("val", "none", self.cfg.max_reference)):
            caches[split] = str(folder / f"cache_{split}")
            pretokenize(PretokenizeConfig(tokenizer=tokenizer_dir, data=data, split=split, resolution=resolution,
                                          out=caches[split], aug=aug, max_images=max_images,
                                          num_workers=self.cfg.num_workers))
        val = CodeCache(caches["val"])
        _, class_counts = reference_classes(caches["val"], caches["train"])
        return {"name": self.name(t), **asdict(t), "tokenizer": tokenizer_dir, "fingerprint": fingerprint,
                "data": data, "caches": caches, "class_counts": class_counts, "sequence_length": val.sequence_length,
                "val_code_share": code_share(val.codes(np.arange(len(val))), t.codebook_size), **rfid}

    def generator(self, tok: dict, seed: int) -> dict:
        """Train (or resume) the class generator of `seed` over `tok`'s codes; its val loss and training speed.

        The run's folder is named by its whole training config and caches: a changed override trains a new
        generator instead of resuming the finished one (whose checkpoint identity holds no optimiser settings)."""
        overrides = [*self.cfg.generator_overrides, f"data.cache={tok['caches']['train']}",
                     f"data.val_cache={tok['caches']['val']}", f"run.seed={seed}"]
        cfg = load_config(GeneratorTrainConfig, self.cfg.generator_config, overrides)
        key = {"config": canonical_container(cfg),
               "caches": {split: CodeCache(path).fingerprint for split, path in tok["caches"].items()}}
        run_dir = self.out / tok["name"] / f"generator_seed{seed}_{identity_hash(key)}"
        cfg = replace(cfg, run=replace(cfg.run, out_dir=str(run_dir)))

        def make() -> dict:
            generator = train_generator(cfg)
            val_loss = train_log(run_dir)[0]
            sequence_length = tok["sequence_length"]
            return {"seed": seed, "generator": str(generator), "run_dir": str(run_dir),
                    "fingerprint": Generator.from_pretrained(generator).fingerprint(), "steps": cfg.run.steps,
                    "val_loss": val_loss,
                    "val_bits_per_image": None if val_loss is None else val_loss * sequence_length / math.log(2),
                    "val_perplexity": None if val_loss is None else math.exp(val_loss)}
        record = reused(run_dir / "study_record.json", key, make)
        # the speed is read from the log each time (records from before the median rule hold another estimate)
        return {**record, "train_tokens_per_s": train_log(run_dir)[1]}

    def measure(self, tok: dict, gen: dict, sampling: SamplingConfig, folder: Path) -> dict:
        """Sample `gen` at `sampling` in the val split's class mix and evaluate against the val split."""
        num = self.cfg.num_samples or sum(tok["class_counts"])
        counts = largest_remainder(tok["class_counts"], num)
        key = {"generator": gen["fingerprint"], "sampling": asdict(sampling), "counts": counts, "num": num,
               "metrics": self.cfg.metrics, "reference": self.cfg.reference, "max_reference": self.cfg.max_reference,
               "fid_source": self.cfg.fid_source, "rfid": tok["rfid"]}

        def make() -> dict:
            sample(SampleConfig(generator=gen["generator"], out=str(folder), num_samples=num, class_counts=counts,
                                sampling=sampling, sampling_preset="none", batch_size=64, save_pngs=False))
            seconds = json.loads((folder / "sampling.json").read_text())["draw_seconds"]
            m = evaluate(EvaluateConfig(samples=str(folder), reference=self.cfg.reference or tok["data"],
                                        reference_split="val",
                                        max_reference=self.cfg.max_reference, metrics=self.cfg.metrics,
                                        fid_source=self.cfg.fid_source, tokenizer_rfid=tok["rfid"]))
            with np.load(folder / "samples.npz") as data:
                codes = data["codes"]
            # the gap only where both FIDs share a reference (rFID is always against the val split)
            gap = None if self.cfg.reference else m["fid"] - tok["rfid"]
            return {**{k: m.get(k) for k in ("fid", "sfid", "precision", "recall")}, "gap": gap,
                    "sample_code_share": code_share(codes, tok["codebook_size"]),
                    "sampling_tokens_per_s": num * tok["sequence_length"] / seconds, "num": num}
        return {**reused(folder / "row.json", key, make), "sampling": asdict(sampling)}


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def run_generation_study(cfg: GenerationStudyConfig) -> dict:
    study = GenerationStudy(cfg)
    rows, sweeps = [], []
    for t in cfg.tokenizers:
        tok = study.tokenizer(t)
        console.print(f"[bold]generation study[/]: {tok['name']} (rFID {tok['rfid']:.2f})")
        gens = []
        for seed in cfg.generator_seeds:
            gen = study.generator(tok, seed)
            gens.append({**gen, **study.measure(tok, gen, cfg.sampling, Path(gen["run_dir"]) / "samples")})
        rows.append({**{k: tok[k] for k in ("name", "kind", "codebook_size", "seed", "fingerprint", "rfid", "psnr",
                                            "utilisation")},
                     "val_code_share": tok["val_code_share"], "generators": gens,
                     "fid": spread([g["fid"] for g in gens]), "gap": None if cfg.reference else spread([g["gap"] for g in gens])})
        if tok["name"] in cfg.sweep_tokenizers:
            for i, (setting, sampling) in enumerate(zip(cfg.sweep, study.sweep)):
                folder = Path(gens[0]["run_dir"]) / f"sweep_{i:02d}"  # with the generator it samples
                sweeps.append({"tokenizer": tok["name"], "setting": setting,
                               **study.measure(tok, gens[0], sampling, folder)})
    result = {"config": asdict(cfg), "rows": rows, "sweep": sweeps, "environment": environment(),
              "command": cfg.command or command_line()}
    write_json_atomic(study.out / "results.json", result)
    if cfg.figure:
        plot_fid_against_k(rows, Path(cfg.figure))
    if cfg.results_md:
        write_section(cfg.results_md, "generation-study", generation_section(result),
                      heading="## What a fully used codebook gives the generator", intro="# Results\n")
    return result


def plot_fid_against_k(rows: list[dict], path: Path) -> Path:
    """Generation FID (each generator seed, and their mean) and rFID against K, one colour per quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, kind in enumerate(dict.fromkeys(r["kind"] for r in rows)):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["codebook_size"])
        sizes = sorted({r["codebook_size"] for r in mine})
        means = [np.mean([g["fid"] for r in mine if r["codebook_size"] == k for g in r["generators"]]) for k in sizes]
        rfids = [np.mean([r["rfid"] for r in mine if r["codebook_size"] == k]) for k in sizes]
        ax.plot(sizes, means, "o-", color=f"C{i}", label=f"{kind}: generation FID (mean)")
        ax.plot(sizes, rfids, "s--", color=f"C{i}", alpha=0.6, label=f"{kind}: rFID (the floor)")
        points = [(r["codebook_size"], g["fid"]) for r in mine for g in r["generators"]]
        ax.scatter(*zip(*points), color=f"C{i}", s=12, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size K")
    ax.set_ylabel("FID (val split)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(values: list[float], digits: int = 1) -> str:
    """One number, or the mean with every seed's value: "151.2 (150.1, 152.3)"; "-" for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def generation_section(result: dict) -> str:
    """RESULTS.md's table: one row per tokenizer, each generator seed's value in brackets after the mean."""
    cfg, env = result["config"], result["environment"]
    lines = [f"Command: `{result['command']}`", "",
             "| quantizer | K | tok. seed | rFID | generation FID | gap (FID - rFID) | sFID | precision / recall | "
             "val bits / image | perplexity / K | codes used: samples / val | train / sample tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        g = r["generators"]

        def values(key: str) -> list[float]:
            return [x[key] for x in g if x.get(key) is not None]

        prc = (f"{np.mean(values('precision')):.3f} / {np.mean(values('recall')):.3f}" if values("precision")
               else "-")
        bits = _cell(values("val_bits_per_image"), 0)
        ppl = (f"{np.mean(values('val_perplexity')):,.0f} / {r['codebook_size']:,}" if values("val_perplexity")
               else "-")
        speed = f"{np.mean(values('train_tokens_per_s')):,.0f} / {np.mean(values('sampling_tokens_per_s')):,.0f}"
        lines.append(f"| {r['kind']} | {r['codebook_size']:,} | {r['seed']} | {r['rfid']:.1f} | "
                     f"{_cell(values('fid'))} | {_cell(values('gap'))} | {_cell(values('sfid'))} | {prc} | {bits} | "
                     f"{ppl} | {np.mean(values('sample_code_share')):.1%} / {r['val_code_share']:.1%} | {speed} |")
    if result["sweep"]:
        lines += ["", "The sampler's share (each tokenizer's generator of the first seed; the best row of each in bold):",
                  "", "| tokenizer | sampler | FID | sFID |", "|---|---|---:|---:|"]
        best = {}
        for s in result["sweep"]:
            if s["tokenizer"] not in best or s["fid"] < best[s["tokenizer"]]["fid"]:
                best[s["tokenizer"]] = s
        for s in result["sweep"]:
            mark = "**" if best[s["tokenizer"]] is s else ""
            sfid = "-" if s["sfid"] is None else f"{s['sfid']:.1f}"
            lines.append(f"| {s['tokenizer']} | {s['setting']} | {mark}{s['fid']:.2f}{mark} | {sfid} |")
    sampling = ", ".join(f"{k} {v}" for k, v in cfg["sampling"].items() if k not in ("seed", "compile"))
    first = result["rows"][0]["generators"][0]
    lines += ["", f"Every generator: `{cfg['generator_config']}` {' '.join(cfg['generator_overrides'])} "
                  f"({first['steps']} steps), generator seeds {cfg['generator_seeds']} (run.seed), over each "
                  f"tokenizer of `{cfg['tokenizer_study']}`; {first['num']} samples each in the val split's class mix "
                  f"at {sampling}, against the val split. Val loss in bits per image = nats per code x codes per "
                  f"image / ln 2; perplexity = exp(nats per code). Tokens/s are the study's own runs', which may "
                  f"have shared the machine with other jobs; K's cost alone, side by side: `python "
                  f"benchmarks/bench_codebook_cost.py` (docs/BENCHMARKS.md). simvq-gen {env['git']}, torch "
                  f"{env['torch']}, {env['cpu_count']} CPU cores."]
    return "\n".join(lines)
