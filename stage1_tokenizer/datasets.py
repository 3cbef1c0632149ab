"""The dataset of a data source and split: the bundled emoji, or an image folder (ImageNet layout included)."""
from __future__ import annotations

import warnings
from pathlib import Path

from simvq_common.errors import ArtifactError

from .emoji import EmojiDataset
from .image_folder import ImageFolderDataset

_SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def build_image_dataset(source: str, split: str, resolution: int, seed: int = 0,
                        random_crop: bool | None = None) -> EmojiDataset | ImageFolderDataset:
    """The dataset for `split` of `source`: "emoji" (bundled) or a folder (how the split's folder is found:
    docs/DATA.md). Split "train" gets random crops, any other split centre crops, unless `random_crop` says
    otherwise (pre-tokenization centre-crops the train split: its codes must not depend on a seed)."""
    if source == "emoji":
        return EmojiDataset(split, resolution)
    root = Path(source).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ArtifactError(f"data source {source!r} is neither 'emoji' nor an image folder: {root} {what}")
    all_split_names = [name for names in _SPLIT_FOLDER_NAMES.values() for name in names]
    candidates = _SPLIT_FOLDER_NAMES.get(split, (split,))
    folder = next((root / name for name in candidates if (root / name).is_dir()), None)
    if folder is None and root.name in candidates:
        folder = root
    if folder is None:
        present = [name for name in all_split_names if (root / name).is_dir()]
        if present:
            raise ArtifactError(f"no '{split}' folder under {root} (it has split folders {present}; "
                                f"expected {root / candidates[0]})")
        folder = root
        if split != "train":
            warnings.warn(f"{root} has no '{split}' subfolder: the '{split}' split uses the same images as "
                          f"training (centre-cropped)", stacklevel=2)
    train = split == "train" if random_crop is None else random_crop
    return ImageFolderDataset(folder, resolution, train=train, seed=seed)
