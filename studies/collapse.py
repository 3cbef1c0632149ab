"""The collapse study: plain VQ, EMA VQ and SimVQ on the same autoencoder, data and budget.

For every (method, codebook size) a small autoencoder is trained on the bundled emoji with
L1 + quantizer loss, then evaluated on the val split (reconstruction MSE, PSNR per image) and
on both splits for codebook usage. The claim under test (SimVQ paper, Table 1): plain VQ uses
a small share of a large codebook, SimVQ nearly all of it.

With `eval_every`, train-split utilisation and perplexity are measured along the way (the curves, on the
first `curve_images` train images when set: a full pass at K = 65,536 costs minutes on a CPU),
and with `plateau_window` a run stops once its train utilisation moved less than `plateau_tolerance`
over that many steps. Finished runs are kept (result.json) and reused when the study is rerun
with the same settings, so runs can be spread over processes that share `out_dir`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from simvq_common.console import console, progress
from simvq_common.errors import ConfigError, NonFiniteLoss
from evaluation.image_metrics import psnr
from simvq_common.io import write_json_atomic
from simvq_common.markdown import write_section
from simvq_common.run_dir import RunDir
from simvq_common.provenance import command_line, environment
from stage1_tokenizer.autoencoder import VQAutoencoder
from stage1_tokenizer.config import QuantizerConfig
from image_data.emoji import ImageSet, load_emoji
from stage1_tokenizer.quantizers import CodebookUsage, display_name
from image_data.transforms import to_model_range
from studies.config import CollapseStudyConfig




@dataclass
class RunResult:
    method: str
    codebook_size: int
    val_mse: float
    val_psnr: float
    val: dict  # CodebookUsage.summary() over the val split
    train: dict  # ... and over the train split
    seconds: float
    final_loss: float
    steps: int = 0  # steps trained (fewer than cfg.steps when the run plateaued)
    curve: list[dict] = field(default_factory=list)  # {step, utilisation, perplexity, latent_norm, code_norm}
    settings: str = ""  # hash of the settings that made it (a rerun with other settings retrains)


@torch.no_grad()
def evaluate(model: VQAutoencoder, images: ImageSet, batch_size: int) -> tuple[CodebookUsage, float, float]:
    """Usage over all tokens of `images`, and mean per-image MSE and PSNR of the reconstructions."""
    model.eval()
    usage = CodebookUsage(model.quantizer.codebook_size)
    mse_sum = psnr_sum = 0.0
    for start in range(0, len(images), batch_size):
        x = to_model_range(images.images[start:start + batch_size])
        reconstruction, q = model(x)
        usage.update(q.indices)
        mse_sum += float((reconstruction.clamp(-1, 1) - x).square().flatten(1).mean(1).sum())
        psnr_sum += float(psnr(reconstruction.clamp(-1, 1), x).sum())
    model.train()
    return usage.merged(), mse_sum / len(images), psnr_sum / len(images)


@torch.no_grad()
def curve_point(model: VQAutoencoder, images: ImageSet, batch_size: int, step: int) -> dict:
    """Train-split usage at `step`, with the scales of the encoder's latents and of the codebook's rows
    (a codebook far larger or smaller than the latents leaves most codes out of reach)."""
    model.eval()
    usage, norm_sum = CodebookUsage(model.quantizer.codebook_size), 0.0
    for start in range(0, len(images), batch_size):
        z = model.encoder(to_model_range(images.images[start:start + batch_size]))
        usage.update(model.quantizer(z).indices)
        norm_sum += float(z.norm(dim=1).sum())
    model.train()
    code_norm = float(model.quantizer.codebook().norm(dim=1).mean())
    return {"step": step, "utilisation": usage.utilisation, "perplexity": usage.perplexity,
            "latent_norm": norm_sum / usage.total, "code_norm": code_norm}


def plateaued(curve: list[dict], window: int, tolerance: float) -> bool:
    """Whether utilisation moved less than `tolerance` over the last `window` steps of the curve."""
    if not window or not curve or curve[-1]["step"] < window:
        return False
    earlier = [p for p in curve if p["step"] == curve[-1]["step"] - window]
    return bool(earlier) and abs(curve[-1]["utilisation"] - earlier[0]["utilisation"]) < tolerance


def run_settings(cfg: CollapseStudyConfig, method: str, codebook_size: int) -> str:
    """What determines one run's result (not where it is written, nor which other runs the study has)."""
    spec = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "methods", "codebook_sizes",
                                                                  "results_md", "command", "figure")}
    spec.update(method=method, codebook_size=codebook_size)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _optimizer(cfg: CollapseStudyConfig, model: VQAutoencoder) -> torch.optim.Optimizer:
    # basis_lr_scale: the SimVQ linear layer's learning rate relative to the rest (an ablation knob)
    basis = list(getattr(model.quantizer, "basis", torch.nn.Module()).parameters())
    basis_ids = {id(p) for p in basis}
    rest = [p for p in model.parameters() if id(p) not in basis_ids]
    groups = [{"params": rest}] + ([{"params": basis, "lr": cfg.lr * cfg.basis_lr_scale}] if basis else [])
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def train_one(cfg: CollapseStudyConfig, method: str, codebook_size: int, train: ImageSet, val: ImageSet,
              run_dir: RunDir) -> RunResult:
    # Same seed for every run: same initial autoencoder weights and the same batch order
    torch.manual_seed(cfg.seed)
    quantizer_cfg = QuantizerConfig(**{**asdict(cfg.quantizer), "kind": method, "codebook_size": codebook_size})
    model = VQAutoencoder(cfg.autoencoder, quantizer_cfg)
    optimizer = _optimizer(cfg, model)
    batches = torch.Generator().manual_seed(cfg.seed)
    window = CodebookUsage(codebook_size)  # usage over the steps since the last log line
    curve_set = train if not cfg.curve_images else ImageSet(train.images[:cfg.curve_images],
                                                          train.labels[:cfg.curve_images],
                                                          train.captions[:cfg.curve_images], train.class_names,
                                                          train.source)
    curve = [curve_point(model, curve_set, cfg.eval_batch_size, 0)] if cfg.eval_every else []
    start, loss, step = time.perf_counter(), torch.tensor(float("nan")), 0
    with progress() as bar:
        task = bar.add_task(f"{method} K={codebook_size:,}", total=cfg.steps, status="")
        while step < cfg.steps and not (step >= cfg.min_steps and plateaued(curve, cfg.plateau_window,
                                                                            cfg.plateau_tolerance)):
            step += 1
            # data: a random batch (the whole set is in memory)
            x = to_model_range(train.images[torch.randint(len(train), (cfg.batch_size,), generator=batches)])
            # forward and losses
            reconstruction, q = model(x)
            recon_loss = F.l1_loss(reconstruction, x)
            loss = recon_loss + q.loss
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"{method} K={codebook_size}: non-finite loss at step {step}; "
                                         f"lower lr (now {cfg.lr})")
            # step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # log
            window.update(q.indices)
            if step % cfg.log_every == 0 or step == cfg.steps:
                stats = window.summary()
                run_dir.log(step=step, loss=loss.item(), l1=recon_loss.item(), quantizer_loss=q.loss.item(),
                            window_utilisation=stats["utilisation"], window_perplexity=stats["perplexity"],
                            images_per_s=step * cfg.batch_size / (time.perf_counter() - start))
                bar.update(task, status=f"loss {loss.item():.3f} ppl {stats['perplexity']:.0f}")
                window = CodebookUsage(codebook_size)
            # the curve: usage of the whole train split
            if cfg.eval_every and step % cfg.eval_every == 0:
                curve.append(curve_point(model, curve_set, cfg.eval_batch_size, step))
                run_dir.log(step=step, **{f"train_{k}": v for k, v in curve[-1].items() if k != "step"})
            bar.advance(task)
    seconds = time.perf_counter() - start
    # evaluate: reconstruction on val, usage on val and train
    val_usage, val_mse, val_psnr = evaluate(model, val, cfg.eval_batch_size)
    train_usage, _, _ = evaluate(model, train, cfg.eval_batch_size)
    title = f"{method} K={codebook_size:,}"
    val_usage.save_plot(run_dir.path("usage_val.png"), title + " (val)")
    train_usage.save_plot(run_dir.path("usage_train.png"), title + " (train)")
    result = RunResult(method, codebook_size, val_mse, val_psnr, val_usage.summary(), train_usage.summary(),
                       seconds, loss.item(), step, curve, run_settings(cfg, method, codebook_size))
    write_json_atomic(run_dir.path("result.json"), asdict(result))
    return result


def uniform_ceiling(codebook_size: int, tokens: int) -> float:
    """Expected utilisation if `tokens` codes were drawn uniformly: the most a finite eval set can show."""
    return 1.0 - math.exp(tokens * math.log1p(-1.0 / codebook_size))


def results_table(results: list[RunResult]) -> str:
    rows = ["| method | K | steps | util (val) | util (train) | ppl (val) | dead (train) | val MSE | val PSNR (dB) "
            "| train time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {display_name(r.method)} | {r.codebook_size:,} | {r.steps:,} | "
                    f"{r.val['utilisation']:.1%} | {r.train['utilisation']:.1%} | {r.val['perplexity']:,.0f} | "
                    f"{r.train['dead']:,} | {r.val_mse:.4f} | {r.val_psnr:.2f} | {r.seconds:.0f} |")
    return "\n".join(rows)


def save_curves(path: Path, results: list[RunResult]) -> Path | None:
    """Train utilisation and perplexity against steps, one column per codebook size, all methods."""
    results = [r for r in results if r.curve]
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.codebook_size for r in results})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 6.5), dpi=100, squeeze=False)
    for col, k in enumerate(sizes):
        for r in (r for r in results if r.codebook_size == k):
            steps = [p["step"] for p in r.curve]
            label = display_name(r.method)
            axes[0, col].plot(steps, [100 * p["utilisation"] for p in r.curve], label=label)
            axes[1, col].plot(steps, [p["perplexity"] for p in r.curve], label=label)
        axes[0, col].set_title(f"K = {k:,}: train utilisation (%)", fontsize=10)
        axes[1, col].set_title(f"K = {k:,}: train perplexity", fontsize=10)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("step")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results_section(path: Path, cfg: CollapseStudyConfig, results: list[RunResult], env: dict,
                          tokens_per_image: int, n_train: int, n_val: int) -> None:
    """Rewrite the collapse-study section of a markdown file, leaving the rest of it alone."""
    val_tokens, train_tokens = n_val * tokens_per_image, n_train * tokens_per_image
    ceilings = ", ".join(f"K={k:,}: {uniform_ceiling(k, val_tokens):.1%} (val) / {uniform_ceiling(k, train_tokens):.1%} (train)"
                         for k in cfg.codebook_sizes)
    ae = cfg.autoencoder
    budget = f"{cfg.steps:,} steps"
    if cfg.plateau_window:
        budget = (f"until train utilisation moved < {cfg.plateau_tolerance:.0%} over {cfg.plateau_window} steps "
                  f"(at least {cfg.min_steps:,}, at most {cfg.steps:,} steps; measured every {cfg.eval_every})")
    figure = ""
    if cfg.figure:
        curve_tokens = (cfg.curve_images or n_train) * tokens_per_image
        ceilings_curve = ", ".join(f"K={k:,}: {uniform_ceiling(k, curve_tokens):.1%}" for k in cfg.codebook_sizes)
        # the markdown file links the figure relative to itself
        link = Path(os.path.relpath(Path(cfg.figure).resolve(), path.resolve().parent)).as_posix()
        figure = (f"\n\nThe curves (every {cfg.eval_every} steps) count utilisation over the first "
                  f"{cfg.curve_images or n_train:,} train images ({curve_tokens:,} tokens; uniform use would show "
                  f"{ceilings_curve}); the table's train column is over the whole split at the end."
                  f"\n\n![utilisation and perplexity against steps]({link})")
    section = f"""Command: `{cfg.command or command_line()}`

Setup: bundled Noto emoji at {cfg.resolution}px ({n_train:,} train / {n_val:,} val images),
autoencoder ch {ae.ch}, ch_mult {ae.ch_mult}, {ae.num_res_blocks} res block(s) per level, code dim {ae.z_channels},
{tokens_per_image} tokens per image; L1 + quantizer loss (beta {cfg.quantizer.beta}), Adam lr {cfg.lr},
betas {tuple(cfg.betas)}, batch {cfg.batch_size}, {budget} (the same seed, initial weights and batches for
every run). Utilisation = share of codes used at least once over all tokens of a split
({val_tokens:,} val tokens, {train_tokens:,} train tokens). Measured with simvq-gen {env['git']},
torch {env['torch']}, {env['cpu_count']} CPU cores.

{results_table(results)}

A finite evaluation set caps the utilisation it can show: uniform draws of that many tokens would reach
{ceilings}.{figure}"""
    write_section(path, "collapse-study", section, heading="## Codebook collapse: plain VQ vs EMA VQ vs SimVQ",
                  intro="# Results\n")


def finished_run(folder: Path, cfg: CollapseStudyConfig, method: str, codebook_size: int) -> RunResult | None:
    """The result a run with these settings already wrote there, if any."""
    path = folder / "result.json"
    if not path.is_file():
        return None
    result = RunResult(**json.loads(path.read_text()))
    if result.settings != run_settings(cfg, method, codebook_size):
        return None
    console.print(f"[dim]{method} K={codebook_size:,}: finished with these settings, reused ({path})[/]")
    return result


def run_collapse_study(cfg: CollapseStudyConfig) -> list[RunResult]:
    out = Path(cfg.out_dir)
    train, val = load_emoji("train", cfg.resolution), load_emoji("val", cfg.resolution)
    down = cfg.autoencoder.downsample_factor
    if cfg.resolution % down:
        raise ConfigError(f"resolution {cfg.resolution} is not divisible by the autoencoder's downsampling {down}")
    tokens_per_image = (cfg.resolution // down) ** 2
    if cfg.plateau_window and (not cfg.eval_every or cfg.plateau_window % cfg.eval_every):
        raise ConfigError(f"plateau_window={cfg.plateau_window} needs eval_every set to a divisor of it "
                          f"(now {cfg.eval_every})")
    if cfg.figure and not cfg.eval_every:
        raise ConfigError("figure needs eval_every > 0: the curves are measured every eval_every steps")
    env = environment()
    RunDir(out, cfg)  # the study's merged config and environment, once
    results = []
    for codebook_size in cfg.codebook_sizes:
        for method in cfg.methods:
            results.append(finished_run(out / f"{method}_K{codebook_size}", cfg, method, codebook_size)
                           or train_one(cfg, method, codebook_size, train, val,
                                        RunDir(out / f"{method}_K{codebook_size}")))
            r = results[-1]
            console.print(f"{method} K={codebook_size:,}: val util {r.val['utilisation']:.1%}, "
                          f"train util {r.train['utilisation']:.1%}, PSNR {r.val_psnr:.2f} dB ({r.seconds:.0f} s)")
    write_json_atomic(out / "results.json", {"config": asdict(cfg), "environment": env,
                                             "tokens_per_image": tokens_per_image,
                                             "results": [asdict(r) for r in results]})
    (out / "results.md").write_text(results_table(results) + "\n")
    if cfg.figure:
        save_curves(Path(cfg.figure), results)
    if cfg.results_md:
        write_results_section(Path(cfg.results_md), cfg, results, env, tokens_per_image, len(train), len(val))
    return results
