"""`simvq eval-tokenizer`: rFID, PSNR, SSIM, LPIPS, utilisation and perplexity over a validation split.

PSNR, SSIM and LPIPS are computed per image and then averaged. rFID compares the reconstructions
with the originals (both at the evaluation resolution) through torch-fidelity with the standard
FID Inception (evaluation.fid). Everything lands in eval.json with its provenance.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from simvq_common import distributed
from simvq_common.console import progress
from simvq_common.errors import ArtifactError, ConfigError
from evaluation.fid import compute_fid
from simvq_common.hub import hub_reference
from evaluation.image_metrics import psnr, ssim
from simvq_common.io import write_json_atomic
from simvq_common.provenance import environment

from .config import TokenizerEvalConfig
from image_data.datasets import build_image_dataset
from image_data.loading import collate_skip_none
from .perceptual import PerceptualBackendUnavailable, build_perceptual_loss
from .quantizers import CodebookUsage
from .tokenizer import Tokenizer
from image_data.transforms import to_uint8
from image_data.visualize import save_image_grid


def perceptual_for_eval(backend: str):
    if backend != "auto":
        return build_perceptual_loss(backend)
    try:
        return build_perceptual_loss("lpips-vgg")
    except PerceptualBackendUnavailable:
        return build_perceptual_loss("stlpips-vgg")


@torch.no_grad()
def evaluate_tokenizer(cfg: TokenizerEvalConfig) -> dict:
    if not cfg.tokenizer:
        raise ConfigError("set tokenizer=DIR (a directory written by train-tokenizer or save_pretrained, or a Hub id)")
    if cfg.resolution <= 0:
        raise ConfigError("set resolution=N, the image size to evaluate at (e.g. 128 for the ImageNet-128 configs)")
    if hub_reference(cfg.tokenizer) is not None and not cfg.out:  # the Hub cache is no place to write into
        raise ConfigError(f"tokenizer={cfg.tokenizer} is a Hub model: set out=PATH for its eval.json")
    distributed.setup()  # join the launcher's group, if any (a lone process joins none)
    device = distributed.device_for(cfg.device)
    tokenizer = Tokenizer.from_pretrained(cfg.tokenizer).to(device)
    dataset = build_image_dataset(cfg.data, cfg.split, cfg.resolution)
    indices = range(min(len(dataset), cfg.max_images) if cfg.max_images else len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size,
                        collate_fn=collate_skip_none)
    perceptual = perceptual_for_eval(cfg.perceptual)
    if perceptual is not None:
        perceptual.to(device)
    usage = CodebookUsage(tokenizer.codebook_size, device)
    originals, reconstructions, per_image, skipped = [], [], {"psnr": [], "ssim": [], "lpips": []}, 0
    with progress() as bar:
        task = bar.add_task("eval-tokenizer", total=len(indices), status="")
        for images, _, n_bad in loader:
            skipped += n_bad
            if len(images):
                images = images.to(device, non_blocking=True)
                reconstruction, q = tokenizer(images)
                reconstruction = reconstruction.clamp(-1, 1)
                usage.update(q.indices)
                per_image["psnr"].append(psnr(reconstruction, images))
                per_image["ssim"].append(ssim(reconstruction, images))
                if perceptual is not None:
                    per_image["lpips"].append(perceptual(reconstruction, images))
                originals.append(to_uint8(images).cpu())  # 50k images stay off the GPU
                reconstructions.append(to_uint8(reconstruction).cpu())
            bar.advance(task, len(images) + n_bad)
    if not originals:
        raise ArtifactError(f"no readable image in {cfg.data} ({cfg.split}): pass a folder of images")
    originals, reconstructions = torch.cat(originals), torch.cat(reconstructions)
    fid = compute_fid(reconstructions, originals, source=cfg.fid_source, device=device)
    out_path = Path(cfg.out) if cfg.out else Path(cfg.tokenizer) / "eval.json"
    grid = save_image_grid(torch.cat([originals[:16], reconstructions[:16]]).float() / 127.5 - 1,
                           out_path.with_name(out_path.stem + "_reconstructions.png"), rows=2)
    usage.save_plot(out_path.with_name(out_path.stem + "_usage.png"), f"tokenizer {tokenizer.fingerprint()}")
    mean = {name: float(torch.cat(values).mean()) if values else None for name, values in per_image.items()}
    result = {
        "tokenizer": str(cfg.tokenizer), "tokenizer_fingerprint": tokenizer.fingerprint(),
        "data": cfg.data, "split": cfg.split, "resolution": cfg.resolution,
        "num_images": len(originals), "skipped_images": skipped,
        "rfid": fid["fid"], **mean,
        "utilisation": usage.utilisation, "perplexity": usage.perplexity, "usage": usage.summary(),
        "conventions": {
            "psnr": "per image on [-1, 1] (peak-to-peak 2), then the mean",
            "ssim": "per image: 11x11 Gaussian window, sigma 1.5, RGB channels averaged (skimage convention)",
            "lpips": None if perceptual is None else perceptual.provenance,
            "rfid": {k: v for k, v in fid.items() if k != "fid"},
        },
        "reconstruction_grid": str(grid),
        "config": asdict(cfg), "environment": environment(),
    }
    write_json_atomic(out_path, result)
    return result


def result_table(result: dict):
    """The headline numbers of an evaluate_tokenizer result, as a rich table."""
    from rich.table import Table

    names = ("rfid", "psnr", "ssim", "lpips", "utilisation", "perplexity")
    table = Table(title=f"tokenizer {result['tokenizer_fingerprint']} on {result['data']} {result['split']} "
                        f"({result['num_images']} images, {result['resolution']} px)")
    for name in names:
        table.add_column(name, justify="right")
    table.add_row(*(f"{result[k]:.4g}" if result[k] is not None else "-" for k in names))
    return table
