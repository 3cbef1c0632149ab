"""What limits the samples: one finished `simvq run`, its class generator measured row by row.

    simvq quality-study run_dir=runs/emoji32_showcase results_md=docs/RESULTS.md figure=docs/figures/quality_steps.png

Rows (each a `simvq sample` + `simvq evaluate` in OUT/<row>/, reused when its generator, sampler settings and
class plan are unchanged, so the study resumes where it stopped):

- checkpoint: the generator as it was at every checkpoint the run kept, at the run's sampler settings, beside
  the validation loss the run logged at that step: where FID stops improving, and whether val loss says so;
- sweep: the final generator over the sampler settings of `sweep` (guidance, temperature, top-k / top-p);
- seed: the best sweep row again with other sampling seeds: the spread a difference must exceed;
- knob: the generator retrained with one change to its training config (size, learning rate, batch, seed...)
  for `knob_steps` (or the knob's own run.steps), sampled at the best sweep row's settings: one knob at a time,
  against the row "" (the run's config at the same steps). A knob's training resumes where it stopped.

Every row: FID and sFID against the val split (the run's reference, class mix and sample count), FID / rFID
(the tokenizer's floor), class agreement beside the classifier's accuracy on real val images; the best row
also memorisation (nearest train images).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from simvq_common.config import load_config
from simvq_common.console import console
from simvq_common.errors import UserError
from simvq_common.io import write_json_atomic
from simvq_common.markdown import write_section
from simvq_common.provenance import command_line, environment
from stage2_generator.config import GeneratorTrainConfig, SamplingConfig
from stage2_generator.model import Generator
from stage2_generator.checkpoints import export_checkpoint
from stage2_generator.train import train_generator

from .conditionings import request_kind
from .config import EvaluateConfig, PipelineConfig, QualityStudyConfig, SampleConfig, sampling_with
from .evaluate import evaluate
from .sample import sample


class Study:
    """The run's facts every row shares, and the measuring of one row."""

    def __init__(self, cfg: QualityStudyConfig) -> None:
        self.cfg, self.run = cfg, Path(cfg.run_dir)
        self.out = Path(cfg.out_dir or self.run / "quality_study")
        record = self.run / "stages" / f"samples-{cfg.generator}.json"
        if not record.is_file():
            raise UserError(f"{self.run} has no finished samples-{cfg.generator} stage: run `simvq run` to its end "
                            f"first (the study reuses its class plan, sample count and sampler settings)")
        inputs = json.loads(record.read_text())["inputs"]
        self.pipeline = load_config(PipelineConfig, self.run / "config.yaml")
        self.class_counts, self.num = inputs["class_counts"], inputs["num"]
        self.sampling = SamplingConfig(**inputs["sampling"])
        self.gen_run = self.run / f"generator_{cfg.generator}"
        self.measured: dict[str, dict] = {}  # key -> row, this call's
        self.rfid = json.loads((self.run / "stages" / "tokenizer-eval.json").read_text())["result"]["rfid"]
        if not request_kind(Generator.from_pretrained(self.gen_run / "generator").config).has_classes:
            raise UserError(f"generator {cfg.generator} of {self.run} is not class-conditional: the study measures "
                            f"class generators (their class plan and class agreement)")

    def val_losses(self, gen_run: Path | None = None) -> dict[int, float]:
        lines = ((gen_run or self.gen_run) / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["val_loss"] for r in map(json.loads, filter(None, lines)) if "val_loss" in r}

    def knob(self, knob: str, sampling: SamplingConfig) -> dict:
        """The run's generator retrained with `knob` (its training resumes), measured at `sampling`."""
        # a knob's own run.steps wins over knob_steps; its folder is named by what it changes, so a knob list
        # reordered or extended between calls finds each finished knob again (never another knob's generator)
        overrides = [*[f"run.steps={self.cfg.knob_steps}"] * bool(self.cfg.knob_steps), *knob.split()]
        name = "knob_" + hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:10]
        folder = self.out / name
        cfg = load_config(GeneratorTrainConfig, self.gen_run / "config.yaml",
                          [*overrides, f"run.out_dir={folder / 'run'}"])
        write_json_atomic(folder / "knob.json", {"knob": knob, "overrides": overrides})
        steps = cfg.run.steps
        timing = folder / "train_seconds.json"
        if not (folder / "run" / "generator" / "model.safetensors").is_file():
            console.print(f"[bold]quality study[/]: training knob {knob or '(as the run)'} for {steps} steps")
            tic = time.time()
            train_generator(cfg)
            write_json_atomic(timing, {"seconds": round(time.time() - tic, 1)})
        losses = self.val_losses(folder / "run")
        return self.measure(name, "knob", folder / "run" / "generator", sampling,
                            setting=knob or "(as the run)", step=steps, val_loss=losses[max(losses)] if losses else None,
                            train_seconds=json.loads(timing.read_text())["seconds"] if timing.is_file() else None)

    def measure(self, name: str, kind: str, generator: Path, sampling: SamplingConfig, memorise: bool = False,
                **extra) -> dict:
        folder = self.out / name
        fingerprint = Generator.from_pretrained(generator).fingerprint()
        key = hashlib.sha256(json.dumps([fingerprint, asdict(sampling), self.class_counts, self.num, memorise,
                                         self.cfg.classifier], sort_keys=True).encode()).hexdigest()[:16]
        done = folder / "row.json"
        saved = json.loads(done.read_text()) if done.is_file() else None
        if saved is not None and saved["key"] == key:
            self.measured.setdefault(key, saved)
            return saved
        if key in self.measured:  # the same generator and settings under another name (the last checkpoint)
            row = {**self.measured[key], "name": name, "kind": kind, **extra}
            write_json_atomic(done, row)
            return row
        console.print(f"[bold]quality study[/]: {name}")
        sample(SampleConfig(generator=str(generator), out=str(folder), num_samples=self.num,
                            class_counts=self.class_counts, sampling=sampling, sampling_preset="none",
                            batch_size=64))
        metrics = ["fid", "sfid"] + ["agreement"] * bool(self.cfg.classifier) + ["memorisation"] * memorise
        m = evaluate(EvaluateConfig(samples=str(folder), reference=self.pipeline.reference or self.pipeline.data,
                                    reference_split="val", metrics=metrics, classifier=self.cfg.classifier,
                                    fid_source=self.pipeline.fid_source, tokenizer_rfid=self.rfid))
        row = {"name": name, "kind": kind, "key": key, "folder": str(folder), "generator": str(generator),
               "fingerprint": fingerprint,
               "sampling": asdict(sampling), "fid": m["fid"], "sfid": m["sfid"], "fid_over_rfid": m["fid_over_rfid"],
               "agreement": m.get("agreement"), "memorisation": m.get("memorisation"), **extra}
        write_json_atomic(done, row)
        self.measured[key] = row
        return row


def run_quality_study(cfg: QualityStudyConfig) -> dict:
    study = Study(cfg)
    rows = []
    if cfg.checkpoints:
        losses = study.val_losses()
        for path in sorted((study.gen_run / "checkpoints").glob("step_*")):
            step = int(path.name.removeprefix("step_"))
            generator = study.out / f"step_{step:06d}" / "generator"
            if not (generator / "model.safetensors").is_file():
                export_checkpoint(study.gen_run, step, generator)
            rows.append(study.measure(f"step_{step:06d}", "checkpoint", generator, study.sampling, step=step,
                                      val_loss=losses.get(step)))
    final = study.gen_run / "generator"
    sweep = [study.measure(f"sweep_{i:02d}", "sweep", final, sampling_with(study.sampling, s), setting=s)
             for i, s in enumerate(cfg.sweep)]
    rows += sweep
    if sweep:
        best = min(sweep, key=lambda r: r["fid"])
        best_sampling = SamplingConfig(**best["sampling"])
        rows += [study.measure(f"seed_{seed}", "seed", final, replace(best_sampling, seed=seed),
                               setting=f"{best['setting']} seed={seed}") for seed in cfg.seeds]
        if cfg.memorisation:
            rows.append(study.measure("best_memorisation", "memorisation", final, best_sampling, memorise=True,
                                      setting=best["setting"]))
    knob_sampling = SamplingConfig(**min(sweep, key=lambda r: r["fid"])["sampling"]) if sweep else study.sampling
    rows += [study.knob(knob, knob_sampling) for knob in cfg.knobs]
    result = {"config": asdict(cfg), "rfid": study.rfid, "num": study.num, "rows": rows,
              "environment": environment(), "command": cfg.command or command_line()}
    write_json_atomic(study.out / "results.json", result)
    if cfg.figure:
        plot_steps(rows, study.rfid, Path(cfg.figure))
    if cfg.results_md:
        write_section(cfg.results_md, "quality-study", quality_section(result),
                      heading="## Images a person recognises: what limits the samples", intro="# Results\n")
    return result


def plot_steps(rows: list[dict], rfid: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["kind"] == "checkpoint"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in points], [r["fid"] for r in points], "o-", label="FID (val split)")
    ax.axhline(rfid, ls="--", color="gray", label=f"tokenizer rFID {rfid:.1f} (the floor)")
    ax.set_xlabel("generator step")
    ax.set_ylabel("FID")
    twin = ax.twinx()
    twin.plot([r["step"] for r in points], [r["val_loss"] for r in points], "s:", color="C3", label="val loss")
    twin.set_ylabel("val loss (nats / code)")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_section(result: dict) -> str:
    def cell(r: dict) -> list[str]:
        a = r.get("agreement") or {}
        agree = f"{a['agreement']:.1%} / {a['real_accuracy']:.1%}" if a else "-"
        return [f"{r['fid']:.2f}", f"{r['fid_over_rfid']:.2f}x", f"{r['sfid']:.1f}", agree]

    lines = [f"Command: `{result['command']}`", "",
             "| row | what | val loss | FID | FID / rFID | sFID | class agreement / classifier on real val |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["kind"] == "memorisation":
            continue
        what = {"checkpoint": f"step {r.get('step')}",
                "knob": f"{r.get('setting')}, {r.get('step')} steps ({r.get('train_seconds') or 0:.0f} s)"}.get(r["kind"], r.get("setting", ""))
        loss = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "-"
        lines.append(f"| {r['kind']} | {what} | {loss} | " + " | ".join(cell(r)) + " |")
    memorised = next((r for r in result["rows"] if r["kind"] == "memorisation"), None)
    if memorised:
        m = memorised["memorisation"]
        lines += ["", f"Memorisation of the best row ({memorised['setting']}): median distance to the nearest train "
                      f"image over the same for real val images = {m['pixels']['ratio']:.2f} in pixels, "
                      f"{m['inception']['ratio']:.2f} in Inception features; near copies (nearer than 99% of real "
                      f"val images are) {m['pixels']['near_copies']:.1%} in pixels, "
                      f"{m['inception']['near_copies']:.1%} in Inception features."]
    env = result["environment"]
    lines += ["", f"{result['num']} samples per row in the val split's class mix against its {result['num']} images; "
                  f"rFID {result['rfid']:.2f}; simvq-gen {env['git']}, torch {env['torch']}, {env['cpu_count']} CPU "
                  f"cores."]
    return "\n".join(lines)
