"""What an evaluation compares: samples (a `simvq sample` directory or any .npz with arr_0), reference images
from a data source at the samples' resolution, and the two class mixes."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from image_data.datasets import build_image_dataset
from image_data.emoji import load_emoji
from image_data.loading import collate_skip_none
from image_data.transforms import to_uint8
from simvq_common.artifacts import expect_kind
from simvq_common.errors import ArtifactError, UserError

from .fid_reference import ADM_IMAGES

LEGACY_IMAGES = "images"  # where samples.npz kept its images before it used ADM's arr_0


def load_samples(path: str | Path) -> tuple[torch.Tensor, Path, dict, np.ndarray | None]:
    """(uint8 (N, 3, H, W), the .npz path, its sampling.json or {}, its class labels or None).

    path: a `simvq sample` directory, its samples.npz, or any .npz with arr_0 (another system's samples).
    """
    path = Path(path)
    if path.is_dir():
        expect_kind(path, "samples")
    npz = path / "samples.npz" if path.is_dir() else path
    if not npz.is_file():
        raise ArtifactError(f"no samples at {path}: give a `simvq sample` output directory or an .npz with "
                            f"{ADM_IMAGES} (uint8 N x H x W x 3)")
    if not zipfile.is_zipfile(npz):  # np.load would try it as a pickle and advise allow_pickle: never do that
        raise ArtifactError(f"{npz} is not an .npz archive (a zip of .npy arrays, as `simvq sample` writes)")
    with np.load(npz, allow_pickle=False) as data:
        key = next((k for k in (ADM_IMAGES, LEGACY_IMAGES) if k in data.files), None)
        if key is None:
            raise UserError(f"{npz} has no {ADM_IMAGES!r} array (uint8 N x H x W x 3); it holds {data.files}")
        images = data[key]
        labels = data["labels"] if "labels" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{npz}: {key} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    sampling = npz.with_name("sampling.json")
    meta = json.loads(sampling.read_text()) if sampling.is_file() and path.is_dir() else {}
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), npz, meta, labels


def class_mix(sample_labels: np.ndarray | None, reference_labels: np.ndarray | None,
              class_names: list[str] | None) -> dict | None:
    """Both class histograms and their total-variation distance (0 = the same mix), when both are known."""
    if sample_labels is None or reference_labels is None or (sample_labels < 0).all():
        return None
    size = max(int(sample_labels.max()), int(reference_labels.max())) + 1
    samples = np.bincount(sample_labels[sample_labels >= 0], minlength=size)
    reference = np.bincount(reference_labels, minlength=size)
    distance = 0.5 * float(np.abs(samples / samples.sum() - reference / reference.sum()).sum())
    return {"samples": samples.tolist(), "reference": reference.tolist(), "class_names": class_names,
            "total_variation": round(distance, 4)}


def reference_images(source: str, split: str, resolution: int,
                     max_images: int) -> tuple[torch.Tensor, np.ndarray, list[str], dict]:
    """uint8 (N, 3, r, r) reference images at the samples' resolution, their labels, class names, description."""
    if source == "emoji":
        emoji = load_emoji(split, resolution)
        images, labels, class_names = emoji.images, emoji.labels.numpy(), emoji.class_names
    else:
        dataset = build_image_dataset(source, split, resolution, random_crop=False)
        count = min(len(dataset), max_images) if max_images else len(dataset)
        loader = DataLoader(torch.utils.data.Subset(dataset, range(count)), batch_size=64,
                            collate_fn=collate_skip_none)
        batches = [batch for batch in loader if len(batch.images)]
        images = torch.cat([to_uint8(batch.images) for batch in batches])
        labels = torch.cat([batch.labels for batch in batches]).numpy()
        class_names = list(dataset.class_names)
    if max_images:
        images, labels = images[:max_images], labels[:max_images]
    return images, labels, class_names, {
        "kind": "images", "source": source, "split": split, "resolution": resolution, "num_images": len(images),
        "preprocessing": "bundled area-downsampling" if source == "emoji"
        else "shorter side resized (bicubic) and centre-cropped, as stage 1 evaluates"}
