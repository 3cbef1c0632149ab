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

from simvq_common.io import write_json_atomic, write_text_atomic  # noqa: E402
from simvq_common.metrics import read_metrics  # noqa: E402
from simvq_common.provenance import environment  # noqa: E402
from stage2_generator.cache import CodeCache  # noqa: E402

from .baseline import code_frequencies  # noqa: E402


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
    freq = np.sort(code_frequencies(cache))[::-1]
    used = int((freq > 0).sum())
    perplexity = float(np.exp(-(freq[freq > 0] * np.log(freq[freq > 0])).sum()))
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


def write_report(out: Path, result: dict) -> None:
    curves = plot_curves(out, result)
    usage_png, usage = plot_code_usage(out, result)
    result = {**result, "code_usage": usage, "environment": environment()}
    write_json_atomic(out / "report.json", result)

    tok = result["tokenizer"]["eval"]
    rfid = tok["conventions"]["rfid"]
    rows = []
    for name, g in result["generators"].items():
        m = g["metrics"]
        rows.append(f"| generator `{name}` ({g['conditioning']}-conditional GPT-{g['size']}, {g['steps']} steps) | "
                    f"{_fmt(m.get('fid'), '.2f')} | {_fmt(m.get('kid_mean'), '.4f')} | {_fmt(m.get('precision'), '.3f')} | "
                    f"{_fmt(m.get('recall'), '.3f')} | {m['num_generated']} |")
    baseline = result["baseline"]
    if baseline:
        m = baseline["metrics"]
        rows.append(f"| baseline: unigram codes, same tokenizer | {_fmt(m.get('fid'), '.2f')} | "
                    f"{_fmt(m.get('kid_mean'), '.4f')} | {_fmt(m.get('precision'), '.3f')} | "
                    f"{_fmt(m.get('recall'), '.3f')} | {m['num_generated']} |")
    rows.append(f"| tokenizer reconstructions (rFID: the floor) | {tok['rfid']:.2f} | - | - | - | {tok['num_images']} |")

    verdicts = []
    if baseline and baseline["metrics"].get("fid") is not None:
        for name, g in result["generators"].items():
            fid, base = g["metrics"].get("fid"), baseline["metrics"]["fid"]
            verdicts.append(f"- generator `{name}`: FID {fid:.2f} vs baseline {base:.2f}: "
                            + ("**lower: stage 2 learned structure the unigram codes lack**" if fid < base else
                               "**not lower: this generator did not beat independent codes**"))

    grids = []
    for name, g in result["generators"].items():
        copied = _copy(g["samples"]["grid"], out, f"grid_{name}.png")
        if copied:
            what = "one row per class" if g["conditioning"] == "class" else "one row per prompt"
            grids.append(f"### Generator `{name}` ({what})\n\n![{name}]({copied})\n")
    if baseline:
        copied = _copy(baseline["samples"]["grid"], out, "grid_baseline.png")
        if copied:
            grids.append(f"### Baseline (unigram codes)\n\n![baseline]({copied})\n")
    recon = _copy(tok.get("reconstruction_grid", ""), out, "tokenizer_reconstructions.png")
    tok_usage = _copy(Path(tok["reconstruction_grid"]).with_name("eval_usage.png"), out, "tokenizer_usage.png") \
        if tok.get("reconstruction_grid") else None

    metrics_any = next(iter(result["generators"].values()))["metrics"] if result["generators"] else tok
    ref = metrics_any.get("reference", {})
    env = result["environment"]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
    md = f"""# simvq run report

Command: `{result['config']['command']}` (config: `{out / 'config.yaml'}`)

## Image quality

| model | FID | KID | precision | recall | N |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{chr(10).join(verdicts)}

FID, KID and precision/recall: {rfid['suite']}, Inception-v3 pool3 (source {rfid['inception_source']}, weights sha256
{rfid['weights_sha256'][:16]}...), TF1-style bilinear resize to 299x299, against the {ref.get('source', result['config']['data'])}
{ref.get('split', 'val')} split ({ref.get('num_images', tok['num_images'])} images at {result['config']['resolution']} px). Generated
samples: class-balanced over every class (text generators: one per val caption), sampling
{json.dumps(result['config']['sampling'])}. At N <= 2048 the FID is biased upward (singular covariance): compare
only within this table, at equal N and reference.

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

- tokenizer `{result['tokenizer']['fingerprint']}`; caches train `{result['caches']['train']['fingerprint']}`
  ({result['caches']['train']['sequences']:,} sequences), val `{result['caches']['val']['fingerprint']}`
- generators: {', '.join(f"`{n}` {g['generator']['fingerprint']}" for n, g in result['generators'].items())}
- simvq-gen {env['git']}, torch {env['torch']}, {env['cpu_count']} CPU cores, GPU {env['cuda'] or 'none'}
- stage times: {timings}

Every number above is in `report.json` with its full provenance; each stage's inputs are in `stages/`.
"""
    write_text_atomic(out / "report.md", md)
