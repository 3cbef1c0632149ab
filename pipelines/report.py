"""The end of `simvq run`: report.json (every number with its provenance) and report.md (tables, sample grids,
loss curves, codebook usage) in the pipeline's folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from simvq_common.io import write_json_atomic, write_text_atomic  # noqa: E402
from simvq_common.markdown import write_section  # noqa: E402
from simvq_common.run_dir import read_metrics  # noqa: E402
from simvq_common.provenance import environment  # noqa: E402
from stage1_tokenizer.quantizers.health import perplexity as usage_perplexity  # noqa: E402
from stage2_generator.cache_reader import CodeCache  # noqa: E402

from .baseline import code_frequencies  # noqa: E402
from .conditionings import request_kind_named  # noqa: E402


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def plot_curves(out: Path, result: dict) -> Path:
    """Training curves: the tokenizer's total loss, each generator's train and val cross-entropy."""
    runs = [("tokenizer", Path(result["tokenizer"]["run_dir"]), ("loss",))]
    runs += [(f"generator {name}", Path(g["run_dir"]), ("loss", "val_loss")) for name, g in result["generators"].items()]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.4), squeeze=False)
    for ax, (title, run_dir, keys) in zip(axes[0], runs):
        records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if key == "val_loss" else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "report" / "loss_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_code_usage(out: Path, result: dict) -> tuple[Path, dict]:
    """How often each code occurs in the train cache, codes sorted by frequency (log scale)."""
    cache = CodeCache(result["caches"]["train"]["path"])
    freq = np.sort(code_frequencies(cache))[::-1].copy()  # torch.from_numpy refuses negative strides
    used = int((freq > 0).sum())
    perplexity = usage_perplexity(torch.from_numpy(freq))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.semilogy(np.arange(1, used + 1), freq[:used])
    ax.set_xlabel("code rank")
    ax.set_ylabel("frequency")
    ax.set_title(f"train-cache code usage: {used:,} of {len(freq):,} codes used, perplexity {perplexity:,.0f}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "report" / "code_usage.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, {"codes_used": used, "codebook_size": len(freq), "utilisation": used / len(freq),
                  "perplexity": perplexity}


def _copy(src: str | Path, out: Path, name: str) -> str | None:
    src = Path(src)
    if not src.is_file():
        return None
    dst = out / "report" / name
    shutil.copyfile(src, dst)
    return f"report/{name}"


QUALITY_HEADER = """| model | class mix | FID | sFID | KID | precision | recall | N |
|---|---|---:|---:|---:|---:|---:|---:|"""
MIX_SHOWN = {"reference": "reference", "balanced": "balanced", "none": "none (unconditional)"}


def quality_rows(result: dict) -> list[str]:
    """Markdown rows: each generator, the baseline, and the tokenizer's reconstructions (the floor), each with
    the class mix of its samples."""
    tok = result["tokenizer"]["eval"]

    def row(what: str, mix: str, m: dict) -> str:
        return (f"| {what} | {mix} | {_fmt(m.get('fid'), '.2f')} | {_fmt(m.get('sfid'), '.2f')} | "
                f"{_fmt(m.get('kid_mean'), '.4f')} | "
                f"{_fmt(m.get('precision'), '.3f')} | {_fmt(m.get('recall'), '.3f')} | {m['num_generated']} |")
    def own_sampler(g: dict) -> str:
        settings = sampler_settings(g["sampling"], result["config"]["sampling"])
        return f"; its sampler: {settings}" if settings else ""
    rows = [row(f"generator `{name}` ({g['conditioning']}-conditional GPT-{g['size']}, {g['steps']} steps"
                f"{own_sampler(g)})",
                MIX_SHOWN[g["samples"]["class_mix"]]
                + (" (val captions)" if request_kind_named(g["conditioning"]).fid_on_captions else ""),
                g["metrics"]) for name, g in result["generators"].items()]
    if result["baseline"]:
        rows.append(row("baseline: unigram codes per class, same tokenizer",
                        MIX_SHOWN[result["baseline"]["samples"]["class_mix"]], result["baseline"]["metrics"]))
    rows.append(f"| tokenizer reconstructions (rFID: the floor) | reference (its images) | {tok['rfid']:.2f} | - | - | "
                f"- | - | {tok['num_images']} |")
    return rows


def class_mix_text(result: dict) -> str:
    """What each class mix of the table means in this run: the reference's counts and their allocation."""
    samples = [g["samples"] for g in result["generators"].values()]
    samples += [result["baseline"]["samples"]] if result["baseline"] else []
    if not samples:
        return ""
    mixes = {s["class_mix"] for s in samples}
    counts = result["reference_class_counts"]
    said = []
    if "reference" in mixes:
        allocated = next(s["class_counts"] for s in samples if s["class_mix"] == "reference")
        said.append(f"*reference*: the samples follow the reference's class mix (val split counts {counts} over "
                    f"its {sum(counts)} images, allocated to N = {sum(allocated)} by largest remainder: "
                    f"{allocated}; text generators take captions of val images of those classes)")
    if "balanced" in mixes:
        said.append(f"*balanced*: round robin over the classes (the reference's own counts: {counts})")
    if "none" in mixes:
        said.append("*none*: an unconditional generator, no classes")
    baseline = ("; the baseline draws each sample's codes from the train codes of its class, with the same classes "
                "as a class generator's samples" if result["baseline"] else "")
    return "Class mix: " + "; ".join(said) + baseline + "."


def verdicts(result: dict) -> list[str]:
    baseline = result["baseline"]
    if not baseline or baseline["metrics"].get("fid") is None:
        return []
    base = baseline["metrics"]["fid"]
    return [f"- generator `{name}`: FID {g['metrics']['fid']:.2f} vs baseline {base:.2f}: "
            + ("**lower: stage 2 learned structure the unigram codes lack**" if g["metrics"]["fid"] < base else
               "**not lower: this generator did not beat independent codes**")
            for name, g in result["generators"].items()]


def first_reference(result: dict) -> dict:
    """The reference the generators' metrics were measured against (the same for all of them)."""
    evaluated = [g["metrics"] for g in result["generators"].values()]
    evaluated += [result["baseline"]["metrics"]] if result["baseline"] else []
    return evaluated[0].get("reference", {}) if evaluated else {}


def describe_reference(ref: dict, result: dict) -> str:
    if ref.get("kind", "images") != "images":  # an ADM reference batch or a statistics file
        return f"the {ref['kind']} {Path(ref['path']).name} ({ref.get('num_images') or '?'} images)"
    return (f"the {ref.get('source', result['config']['data'])} {ref.get('split', 'val')} split "
            f"({ref.get('num_images', result['tokenizer']['eval']['num_images'])} images at "
            f"{result['config']['resolution']} px)")


def sampler_settings(sampling: dict, run_sampling: dict | None = None) -> str:
    """A sampler's settings (those that differ from the run's, when given), for a row label or a grid heading."""
    return ", ".join(f"{k} {v}" for k, v in sampling.items()
                     if k != "compile" and (run_sampling is None or run_sampling.get(k) != v))


def write_results_section(path: str | Path, out: Path, result: dict) -> None:
    """A section of docs/RESULTS.md: the quality table with its provenance, and the grids copied beside it."""
    path = Path(path)
    figures = path.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    grids = []
    for name, g in result["generators"].items():
        if Path(g["samples"]["grid"]).is_file():
            shutil.copyfile(g["samples"]["grid"], figures / f"{out.name}_{name}.png")
            grids.append(f"![{name}: {sampler_settings(g['sampling'])}](figures/{out.name}_{name}.png)")
    tok, env = result["tokenizer"]["eval"], result["environment"]
    rfid = tok["conventions"]["rfid"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
    body = f"""Command: `{result['config']['command'] or 'simvq run'}` ({sum(result['timings'].values()) / 60:.0f} min of
stage time on this machine: {stages}). simvq-gen {env['git']}, torch {env['torch']}, {env['cpu_count']} CPU
cores, GPU {env['cuda'] or 'none'}.

{QUALITY_HEADER}
{chr(10).join(quality_rows(result))}

{chr(10).join(verdicts(result))}

{class_mix_text(result)}

Against {describe_reference(first_reference(result), result)}; {rfid['suite']}, Inception source
{rfid['inception_source']} (weights sha256 {rfid['weights_sha256'][:16]}...); sampling
{json.dumps(result['config']['sampling'])} (or a generator's own: its row says); tokenizer `{result['tokenizer']['fingerprint']}` (PSNR {tok['psnr']:.2f} dB,
val utilisation {tok['utilisation']:.1%}). At this N the FID is biased upward: compare within the table only.
Samples (one row per class / prompt):

{chr(10).join(grids)}
"""
    write_section(path, f"pipeline-{out.name}", body, heading=f"## The whole system: `{out.name}`",
                  intro="# Results\n")


def write_report(out: Path, result: dict) -> dict:
    """report.json and report.md (with its PNGs under report/); returns the result as report.json holds it."""
    curves = plot_curves(out, result)
    usage_png, usage = plot_code_usage(out, result)
    result = {**result, "code_usage": usage, "environment": environment()}
    write_json_atomic(out / "report.json", result)

    tok = result["tokenizer"]["eval"]
    rfid = tok["conventions"]["rfid"]
    rows, verdict_lines = quality_rows(result), verdicts(result)
    baseline = result["baseline"]

    grids = []
    for name, g in result["generators"].items():
        copied = _copy(g["samples"]["grid"], out, f"grid_{name}.png")
        if copied:
            what = request_kind_named(g["conditioning"]).grid_rows
            grids.append(f"### Generator `{name}` ({what}; {sampler_settings(g['sampling'])})\n\n"
                         f"![{name}]({copied})\n")
    if baseline:
        copied = _copy(baseline["samples"]["grid"], out, "grid_baseline.png")
        if copied:
            grids.append(f"### Baseline (unigram codes per class)\n\n![baseline]({copied})\n")
    for name, ready in result.get("ready_made", {}).items():
        copied = _copy(ready["grid"], out, f"grid_ready_made_{name}.png")
        if copied:
            grids.append(f"### Ready-made `{name}` (models/; the showcase recipe, docs/RESULTS.md; "
                         f"{sampler_settings(ready['sampling'])})\n\n"
                         f"![{name}]({copied})\n")
    recon = _copy(tok.get("reconstruction_grid", ""), out, "tokenizer_reconstructions.png")
    tok_usage = _copy(Path(tok["reconstruction_grid"]).with_name("eval_usage.png"), out, "tokenizer_usage.png") \
        if tok.get("reconstruction_grid") else None

    ref = first_reference(result)
    env = result["environment"]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
    md = f"""# simvq run report

Command: `{result['config']['command']}` (config: `{out / 'config.yaml'}`)

## Image quality

{QUALITY_HEADER}
{chr(10).join(rows)}

{chr(10).join(verdict_lines)}

FID, KID and precision/recall: {rfid['suite']}, Inception-v3 pool3 (sFID: its mixed_6/conv features; source {rfid['inception_source']}, weights sha256
{rfid['weights_sha256'][:16]}...), TF1-style bilinear resize to 299x299, against {describe_reference(ref, result)}. Sampling
{json.dumps(result['config']['sampling'])}, or a generator's own (its row says). At N <= 2048 the FID is biased upward (singular covariance): compare
only within this table, at equal N, reference and class mix.

{class_mix_text(result)}

## Tokenizer

| fingerprint | rFID | PSNR (dB) | SSIM | LPIPS | utilisation | perplexity |
|---|---:|---:|---:|---:|---:|---:|
| `{result['tokenizer']['fingerprint']}` | {tok['rfid']:.2f} | {tok['psnr']:.2f} | {tok['ssim']:.3f} | {_fmt(tok['lpips'], '.3f')} | {tok['utilisation']:.1%} | {tok['perplexity']:,.0f} |

Codes of the train cache: {usage['codes_used']:,} of {usage['codebook_size']:,} used
({usage['utilisation']:.1%}), perplexity {usage['perplexity']:,.0f}.

{f'![reconstructions]({recon})' if recon else ''}

## Samples

{chr(10).join(grids)}

## Training curves and codebook usage

![loss curves](report/{curves.name})

![code usage](report/{usage_png.name})
{f'{chr(10)}![tokenizer usage on val]({tok_usage}){chr(10)}' if tok_usage else ''}
## Provenance

- tokenizer `{result['tokenizer']['fingerprint']}`; caches {', '.join(f"{key} `{c['fingerprint']}` ({c['sequences']:,} sequences)"
                                                              for key, c in result['caches'].items())}
- generators: {', '.join(f"`{n}` {g['generator']['fingerprint']}" for n, g in result['generators'].items())}
- simvq-gen {env['git']}, torch {env['torch']}, {env['cpu_count']} CPU cores, GPU {env['cuda'] or 'none'}
- stage times: {timings}

Every number above is in `report.json` with its full provenance; each stage's inputs are in `stages/`.
"""
    write_text_atomic(out / "report.md", md)
    return result
