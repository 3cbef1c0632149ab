"""Images of an ImageFolder-style tree as a Dataset, unreadable files skipped and logged."""
from __future__ import annotations

import operator
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from simvq_common.errors import ArtifactError, ConfigError

from .transforms import center_crop, image_to_rgb, random_crop, to_model_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# what an error about a data source that holds none of them lists (docs/DATA.md describes each)
ACCEPTED_LAYOUTS = ("the layouts accepted (docs/DATA.md): source=emoji (the bundled emoji); class subfolders of "
                    "images (ImageNet's train/n01440764/*.JPEG); a flat folder of images; a folder with a "
                    "metadata.jsonl (one {\"file_name\": ..., \"text\": ...} object per line); images with .txt "
                    "caption sidecars (a/b.jpg + a/b.txt); WebDataset tar shards (*.tar holding KEY.jpg + KEY.txt "
                    "or KEY.json)")


class BadImageWarning(UserWarning):
    """An image file could not be decoded (or lacked the caption it needed) and its item was skipped."""


class MissingCaptionError(ValueError):
    """An item's caption is missing or empty while the dataset requires captions (`require_captions=True`)."""


class BadFileLog:
    """The unreadable files met by the process that owns this object (a DataLoader worker holds its own copy).

    `skipped` counts skipped items (a bad file again each time it is read), `errors` maps each bad path to its
    first error, which raises one BadImageWarning. Count a run's skips from the batches (`ImageBatch.skipped`).
    """

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self.skipped = 0

    def record(self, path: str, error: BaseException) -> None:
        self.skipped += 1
        if path not in self.errors:
            self.errors[path] = f"{type(error).__name__}: {error}"
            what = "image without a caption" if isinstance(error, MissingCaptionError) else "unreadable image"
            warnings.warn(f"skipping {what} {path}: {self.errors[path]}", BadImageWarning, stacklevel=3)

    @property
    def paths(self) -> list[str]:
        return list(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def __repr__(self) -> str:
        return f"BadFileLog({len(self)} bad files, {self.skipped} skipped items)"


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(directory: Path) -> list[str]:
    """Image files anywhere below `directory` (symlinks followed, hidden names skipped), sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, name) for name in filenames if _is_image_name(name))
    return sorted(found)


def check_index(index, length: int) -> int:
    """A dataset index (negative counts from the end) as a position in [0, length), or IndexError."""
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return i


def warn_if_truncated_images_allowed() -> None:
    """Warn when other code set PIL's LOAD_TRUNCATED_IMAGES: truncated JPEGs must fail to decode, not be padded."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated "
                      "images will be padded with grey instead of being skipped", RuntimeWarning, stacklevel=3)


def decode_image(file, resolution: int, train: bool, seed: int, epoch: int, index: int) -> torch.Tensor:
    """An image file (path or binary file object) as float32 (3, R, R) in [-1, 1]: the transform of docs/DATA.md
    (random crop of item `index` in `epoch` if `train`, else the centre crop); raises if it does not decode."""
    with Image.open(file) as img:
        img.load()  # decode everything now: truncation and corruption raise here
        rgb = image_to_rgb(img)
    if train:
        rgb = random_crop(rgb, resolution, seed, epoch, index)
    else:
        rgb = center_crop(rgb, resolution)
    pixels = np.array(rgb, dtype=np.uint8)
    return to_model_range(torch.from_numpy(pixels).permute(2, 0, 1)).contiguous()


def check_image_arguments(resolution: int, seed: int) -> None:
    """What every image dataset refuses: a non-positive resolution, a negative seed."""
    if int(resolution) < 1:
        raise ConfigError(f"resolution must be a positive number of pixels, got {resolution}")
    if int(seed) < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")


class ImageFolderDataset(Dataset):
    """Images of an ImageFolder-style tree: class subfolders (ImageNet's train/n01440764/*.JPEG) or a flat folder.

    Item i: (float32 (3, R, R) in [-1, 1], label), the shorter side resized to R, then a random crop (train,
    a function of (seed, epoch, i): call `set_epoch` before each epoch's DataLoader iterator) or the centre
    crop; None for an unreadable file, logged in `bad_files`. Which folders are classes: docs/DATA.md.
    Captions (`caption(i)`) are the class names.
    """

    caption_source = "class names"
    shard_boundaries = None  # not tar shards: any sampler order reads files equally fast

    def __init__(self, root: str | os.PathLike, resolution: int, train: bool, seed: int = 0) -> None:
        check_image_arguments(resolution, seed)
        self.root = Path(root)
        self.resolution, self.train, self.seed, self.epoch = int(resolution), bool(train), int(seed), 0
        self.class_names, self.samples = self._scan(self.root)
        self.bad_files = BadFileLog()
        warn_if_truncated_images_allowed()

    @staticmethod
    def _scan(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
        if not root.exists():
            raise ArtifactError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"image folder {root} is not a directory")
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        subdirs = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
        loose = [e.path for e in entries if _is_image_name(e.name) and e.is_file()]
        per_class = {name: _images_under(root / name) for name in subdirs}
        classes = [name for name in subdirs if per_class[name]]
        if classes:
            empty = [name for name in subdirs if not per_class[name]]
            if empty:
                warnings.warn(f"{len(empty)} subfolder(s) of {root} hold no images and are not classes: "
                              f"{empty[:5]}{' ...' if len(empty) > 5 else ''}", stacklevel=3)
            if loose:
                warnings.warn(f"{len(loose)} image(s) lying directly in {root} are ignored: it has class "
                              f"subfolders", stacklevel=3)
            samples = [(path, label) for label, name in enumerate(classes) for path in per_class[name]]
            return classes, samples
        if loose:
            return [root.resolve().name or "images"], [(path, 0) for path in loose]
        raise ArtifactError(
            f"no images found under {root} (expected class subfolders of {'/'.join(IMAGE_EXTENSIONS)} files, "
            f"or such files directly in it)")

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def caption(self, index: int) -> str | None:
        """Item `index`'s caption: its class name."""
        return self.class_names[self.samples[check_index(index, len(self))][1]]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` in the current epoch; raises on an unreadable file (`__getitem__` does not)."""
        path, label = self.samples[index]
        return decode_image(path, self.resolution, self.train, self.seed, self.epoch, index), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        index = check_index(index, len(self))
        try:
            return self.load(index)
        except Exception as error:  # noqa: BLE001 - any decoder failure: skip the item, never the epoch
            self.bad_files.record(self.samples[index][0], error)
            return None

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.class_names)} classes, "
                f"{self.resolution}px, {'random' if self.train else 'centre'} crop)")
