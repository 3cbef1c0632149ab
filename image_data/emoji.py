"""The bundled Noto emoji set: real images with class labels and captions, offline."""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from simvq_common.errors import ArtifactError, ConfigError

from .image_folder import BadFileLog, check_index
from .transforms import to_model_range

EMOJI_PATH = Path(__file__).resolve().parent / "assets" / "noto_emoji_64.npz"
EMOJI_NATIVE_RESOLUTION = 64
SPLITS = ("train", "val", "all")


@dataclass
class ImageSet:
    """Images held in memory as uint8 (N, 3, H, W), with labels and captions."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]
    class_names: list[str]
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]


@lru_cache(maxsize=1)
def _emoji_arrays() -> dict[str, np.ndarray]:
    if not EMOJI_PATH.is_file():
        raise ArtifactError(f"bundled emoji dataset missing at {EMOJI_PATH}: rebuild it with "
                            f"`python scripts/build_emoji_dataset.py` (needs npm) or reinstall the package")
    with np.load(EMOJI_PATH) as data:
        return {key: data[key] for key in data.files}


def load_emoji(split: str = "train", resolution: int = 64) -> ImageSet:
    """The bundled emoji at `resolution` px (area-downsampled from 64), split 'train', 'val' or 'all'."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}': expected one of {SPLITS}")
    if not 1 <= resolution <= EMOJI_NATIVE_RESOLUTION:
        raise ConfigError(f"emoji resolution must lie in [1, {EMOJI_NATIVE_RESOLUTION}] px, got {resolution}")
    arrays = _emoji_arrays()
    keep = _in_split(arrays, split)
    images = torch.from_numpy(arrays["images"][keep]).permute(0, 3, 1, 2).contiguous()
    if resolution != EMOJI_NATIVE_RESOLUTION:
        resized = F.interpolate(images.float(), size=(resolution, resolution), mode="area")
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(
        images=images,
        labels=torch.from_numpy(arrays["labels"][keep]),
        captions=[str(name) for name in arrays["cldr_names"][keep]],
        class_names=[str(name) for name in arrays["categories"]],
        source=f"{arrays['source']}; split={split}; {resolution}px",
    )


def _in_split(arrays: dict[str, np.ndarray], split: str) -> np.ndarray:
    return np.ones(len(arrays["labels"]), bool) if split == "all" else arrays["split"] == SPLITS.index(split)


def emoji_captions_identity() -> str:
    """16 hex of the captions of every image: what a text cache of the emoji depends on besides the pixels."""
    return hashlib.sha256("\n".join(map(str, _emoji_arrays()["cldr_names"])).encode("utf-8")).hexdigest()[:16]


def find_emoji(name: str, split: str = "train") -> int:
    """The index in load_emoji(split) of the image named `name`: its caption (the CLDR name, "red heart") or its
    Unicode character name ("heavy black heart", the captions before 2026-12-07); the first of several. A name
    that is one image's caption and another's Unicode name ("grinning face with smiling eyes") finds the caption's."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}': expected one of {SPLITS}")
    arrays = _emoji_arrays()
    keep = _in_split(arrays, split)
    for names in (arrays["cldr_names"][keep], arrays["names"][keep]):
        found = np.flatnonzero(names == name)
        if len(found):
            return int(found[0])
    named = (arrays["cldr_names"] == name) | (arrays["names"] == name)
    if named.any():  # in the other split
        raise ConfigError(f"no {split} emoji is named {name!r}: it is in the "
                          f"{SPLITS[int(arrays['split'][named][0])]} split (pass that split)")
    known = [str(n) for n in np.concatenate([arrays["cldr_names"][keep], arrays["names"][keep]])]
    near = difflib.get_close_matches(name, known, n=3)
    raise ConfigError(f"no {split} emoji is named {name!r}: give its caption (a CLDR name, like 'red heart') or its "
                      f"Unicode character name" + (f"; near: {near}" if near else ""))


class EmojiDataset(Dataset):
    """The bundled emoji (load_emoji) as a Dataset with ImageFolderDataset's item format and interface."""

    caption_source = "emoji names"
    shard_boundaries = None  # in memory: no tar shards

    def __init__(self, split: str = "train", resolution: int = 64) -> None:
        self.image_set = load_emoji(split, resolution)
        self.split, self.resolution, self.epoch = split, resolution, 0
        self.class_names = self.image_set.class_names
        self.captions = self.image_set.captions  # item i's caption (its emoji name), aligned with the items
        self.bad_files = BadFileLog()  # always empty: the images are in memory

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)  # no randomness to reseed: images are already at `resolution`

    def __len__(self) -> int:
        return len(self.image_set)

    @property
    def labels(self) -> list[int]:
        return self.image_set.labels.tolist()

    def caption(self, index: int) -> str:
        """Item `index`'s caption: its emoji name (never missing)."""
        return self.captions[check_index(index, len(self))]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = check_index(index, len(self))
        return to_model_range(self.image_set.images[index]), int(self.image_set.labels[index])

    def __repr__(self) -> str:
        return f"EmojiDataset(split={self.split!r}, {len(self)} images, {self.resolution}px)"
