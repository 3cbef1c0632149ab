"""The collapse study: plain VQ, EMA VQ and SimVQ on the same autoencoder, data and budget.

For every (method, codebook size) a small autoencoder is trained on the bundled emoji with
L1 + quantizer loss, then evaluated on the val split (reconstruction MSE, PSNR per image) and
on both splits for codebook usage. The claim under test (SimVQ paper, Table 1): plain VQ uses
a small share of a large codebook, SimVQ nearly all of it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from simvq_common.console import console, progress
from simvq_common.errors import ConfigError, NonFiniteLoss
from simvq_common.image_metrics import psnr
from simvq_common.io import write_json_atomic
from simvq_common.markdown import write_section
from simvq_common.run_dir import RunDir
from simvq_common.provenance import command_line, environment
from stage1_tokenizer.autoencoder import VQAutoencoder
from stage1_tokenizer.config import QuantizerConfig
from stage1_tokenizer.emoji import ImageSet, load_emoji
from stage1_tokenizer.quantizers import CodebookUsage
from stage1_tokenizer.transforms import to_model_range
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


def train_one(cfg: CollapseStudyConfig, method: str, codebook_size: int, train: ImageSet, val: ImageSet,
              run_dir: RunDir) -> RunResult:
    # Same seed for every run: same initial autoencoder weights and the same batch order
    torch.manual_seed(cfg.seed)
    quantizer_cfg = QuantizerConfig(**{**asdict(cfg.quantizer), "kind": method, "codebook_size": codebook_size})
    model = VQAutoencoder(cfg.autoencoder, quantizer_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    batches = torch.Generator().manual_seed(cfg.seed)
    window = CodebookUsage(codebook_size)  # usage over the steps since the last log line
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    with progress() as bar:
        task = bar.add_task(f"{method} K={codebook_size:,}", total=cfg.steps, status="")
        for step in range(1, cfg.steps + 1):
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
            bar.advance(task)
    seconds = time.perf_counter() - start
    # evaluate: reconstruction on val, usage on val and train
    val_usage, val_mse, val_psnr = evaluate(model, val, cfg.eval_batch_size)
    train_usage, _, _ = evaluate(model, train, cfg.eval_batch_size)
    title = f"{method} K={codebook_size:,}"
    val_usage.save_plot(run_dir.path("usage_val.png"), title + " (val)")
    train_usage.save_plot(run_dir.path("usage_train.png"), title + " (train)")
    result = RunResult(method, codebook_size, val_mse, val_psnr, val_usage.summary(), train_usage.summary(),
                       seconds, loss.item())
    write_json_atomic(run_dir.path("result.json"), asdict(result))
    return result


def uniform_ceiling(codebook_size: int, tokens: int) -> float:
    """Expected utilisation if `tokens` codes were drawn uniformly: the most a finite eval set can show."""
    return 1.0 - math.exp(tokens * math.log1p(-1.0 / codebook_size))


def results_table(results: list[RunResult]) -> str:
    rows = ["| method | K | util (val) | util (train) | ppl (val) | dead (train) | val MSE | val PSNR (dB) | train time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"vq": "plain VQ", "ema_vq": "EMA VQ", "simvq": "SimVQ"}
    for r in results:
        rows.append(f"| {names.get(r.method, r.method)} | {r.codebook_size:,} | {r.val['utilisation']:.1%} | "
                    f"{r.train['utilisation']:.1%} | {r.val['perplexity']:,.0f} | {r.train['dead']:,} | "
                    f"{r.val_mse:.4f} | {r.val_psnr:.2f} | {r.seconds:.0f} |")
    return "\n".join(rows)


def write_results_section(path: Path, cfg: CollapseStudyConfig, results: list[RunResult], env: dict,
                          tokens_per_image: int, n_train: int, n_val: int) -> None:
    """Rewrite the collapse-study section of a markdown file, leaving the rest of it alone."""
    val_tokens, train_tokens = n_val * tokens_per_image, n_train * tokens_per_image
    ceilings = ", ".join(f"K={k:,}: {uniform_ceiling(k, val_tokens):.1%} (val) / {uniform_ceiling(k, train_tokens):.1%} (train)"
                         for k in cfg.codebook_sizes)
    ae = cfg.autoencoder
    section = f"""Command: `{cfg.command or command_line()}`

Setup: bundled Noto emoji at {cfg.resolution}px ({n_train:,} train / {n_val:,} val images),
autoencoder ch {ae.ch}, ch_mult {ae.ch_mult}, {ae.num_res_blocks} res block(s) per level, code dim {ae.z_channels},
{tokens_per_image} tokens per image; L1 + quantizer loss (beta {cfg.quantizer.beta}), Adam lr {cfg.lr},
betas {tuple(cfg.betas)}, batch {cfg.batch_size}, {cfg.steps} steps (the same seed, initial weights and batches for
every run). Utilisation = share of codes used at least once over all tokens of a split
({val_tokens:,} val tokens, {train_tokens:,} train tokens). Measured with simvq-gen {env['git']},
torch {env['torch']}, {env['cpu_count']} CPU cores.

{results_table(results)}

A finite evaluation set caps the utilisation it can show: uniform draws of that many tokens would reach
{ceilings}."""
    write_section(path, "collapse-study", section, heading="## Codebook collapse: plain VQ vs EMA VQ vs SimVQ",
                  intro="# Results\n")


def run_collapse_study(cfg: CollapseStudyConfig) -> list[RunResult]:
    out = Path(cfg.out_dir)
    train, val = load_emoji("train", cfg.resolution), load_emoji("val", cfg.resolution)
    down = cfg.autoencoder.downsample_factor
    if cfg.resolution % down:
        raise ConfigError(f"resolution {cfg.resolution} is not divisible by the autoencoder's downsampling {down}")
    tokens_per_image = (cfg.resolution // down) ** 2
    env = environment()
    RunDir(out, cfg)  # the study's merged config and environment, once
    results = []
    for codebook_size in cfg.codebook_sizes:
        for method in cfg.methods:
            run_dir = RunDir(out / f"{method}_K{codebook_size}")
            results.append(train_one(cfg, method, codebook_size, train, val, run_dir))
            r = results[-1]
            console.print(f"{method} K={codebook_size:,}: val util {r.val['utilisation']:.1%}, "
                          f"train util {r.train['utilisation']:.1%}, PSNR {r.val_psnr:.2f} dB ({r.seconds:.0f} s)")
    write_json_atomic(out / "results.json", {"config": asdict(cfg), "environment": env,
                                             "tokens_per_image": tokens_per_image,
                                             "results": [asdict(r) for r in results]})
    (out / "results.md").write_text(results_table(results) + "\n")
    if cfg.results_md:
        write_results_section(Path(cfg.results_md), cfg, results, env, tokens_per_image, len(train), len(val))
    return results
