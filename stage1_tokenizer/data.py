"""Image data for stage 1.

- The bundled Noto emoji set (offline, real images, class labels, captions): `load_emoji`, `EmojiDataset`.
- Any ImageFolder-style tree (ImageNet layout included): `ImageFolderDataset`, built by `build_image_dataset`.
- `EpochSampler`: a per-epoch permutation sharded over ranks that can resume mid-epoch bit-exactly.
- `collate_skip_none`: drops unreadable items and reports how many it dropped.

Every random choice is a pure function of (seed, epoch, index), never of the global RNG, so a batch does
not depend on the number of DataLoader workers, the number of processes or where a run was resumed.
"""
from __future__ import annotations

import hashlib
import math
import operator
import os
import warnings
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import Dataset, Sampler, default_collate

from simvq_common import distributed

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
        raise FileNotFoundError(f"bundled emoji dataset missing at {EMOJI_PATH}: rebuild it with "
                                f"`python scripts/build_emoji_dataset.py` (needs npm) or reinstall the package")
    with np.load(EMOJI_PATH) as data:
        return {key: data[key] for key in data.files}


def load_emoji(split: str = "train", resolution: int = 64) -> ImageSet:
    """The bundled emoji at `resolution` px (area-downsampled from 64), split 'train', 'val' or 'all'."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}': expected one of {SPLITS}")
    if not 1 <= resolution <= EMOJI_NATIVE_RESOLUTION:
        raise ValueError(f"emoji resolution must lie in [1, {EMOJI_NATIVE_RESOLUTION}] px, got {resolution}")
    arrays = _emoji_arrays()
    keep = np.ones(len(arrays["labels"]), bool) if split == "all" else arrays["split"] == SPLITS.index(split)
    images = torch.from_numpy(arrays["images"][keep]).permute(0, 3, 1, 2).contiguous()
    if resolution != EMOJI_NATIVE_RESOLUTION:
        resized = F.interpolate(images.float(), size=(resolution, resolution), mode="area")
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(
        images=images,
        labels=torch.from_numpy(arrays["labels"][keep]),
        captions=[str(name) for name in arrays["names"][keep]],
        class_names=[str(name) for name in arrays["categories"]],
        source=f"{arrays['source']}; split={split}; {resolution}px",
    )


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the autoencoder sees."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# Datasets for the stage-1 trainer: items are (image float (3, H, W) in [-1, 1], int label) or None
# ------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL's bicubic resize is antialiased when downsampling (the filter support widens with the scale
# factor), i.e. the same numbers as torchvision's Resize(..., BICUBIC) on PIL images.
RESIZE_FILTER = Image.Resampling.BICUBIC
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def _derived_rng(tag: str, *key: int) -> np.random.Generator:
    """A generator that is a pure function of (tag, *key): no global RNG, no collisions between keys."""
    text = ":".join([tag, *(str(int(k)) for k in key)])
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


class BadImageWarning(UserWarning):
    """An image file could not be decoded and its item was skipped."""


class BadFileLog:
    """The unreadable files met by the process that owns this object.

    `skipped` counts skipped items (a bad file is counted again every time it is read), `errors` maps
    each distinct bad path to its first error. The first failure of each path raises one
    BadImageWarning naming the path and the error. With DataLoader workers each worker holds its own
    copy (in its own process), so the copy in the main process stays empty: count skips from the
    batches instead (`ImageBatch.skipped`, see `collate_skip_none`).
    """

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self.skipped = 0

    def record(self, path: str, error: BaseException) -> None:
        self.skipped += 1
        if path not in self.errors:
            self.errors[path] = f"{type(error).__name__}: {error}"
            warnings.warn(f"skipping unreadable image {path}: {self.errors[path]}", BadImageWarning, stacklevel=3)

    @property
    def paths(self) -> list[str]:
        return list(self.errors)

    def __len__(self) -> int:
        return len(self.errors)

    def __repr__(self) -> str:
        return f"BadFileLog({len(self)} bad files, {self.skipped} skipped items)"


def image_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    Transparency (RGBA, LA, PA, P or L/RGB with a tRNS colour) is composited on white, like the bundled
    emoji. 16-bit greyscale (I;16*, and 'I', which older Pillow gives for 16-bit PNGs) is scaled by
    255/65535; float 'F' images are taken as [0, 1]. CMYK, YCbCr, palette, 1-bit, L go through PIL's
    convert (CMYK naively: ICC profiles are ignored). EXIF orientation is not applied (as in the
    paper's ImageNet pipeline).
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img).astype(np.float64) * 255.0
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` px, keeping the aspect (longer side truncated, as torchvision)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), RESIZE_FILTER)


def center_crop_offset(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of the centred size x size crop; torchvision's rounding."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def random_crop_offset(w: int, h: int, size: int, seed: int, epoch: int, index: int) -> tuple[int, int]:
    """(left, top) of the random crop of item `index` in `epoch`: a pure function of its arguments."""
    rng = _derived_rng("random-crop", seed, epoch, index)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return left, top


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(directory: Path) -> list[str]:
    """Image files anywhere below `directory` (symlinks followed, hidden names skipped), sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, name) for name in filenames if _is_image_name(name))
    return sorted(found)


def _check_index(index, length: int) -> int:
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return i


class ImageFolderDataset(Dataset):
    """Images from an ImageFolder-style tree (class subfolders, e.g. ImageNet's train/n01440764/*.JPEG).

    Layout: every non-hidden subfolder of `root` that holds images (at any depth) is a class; class ids
    follow the sorted folder names, files are sorted by path. Subfolders without images are left out
    (with a warning: class ids then shift, compare `class_names` across splits). Images lying directly
    in `root` are ignored when class subfolders exist (warned); a folder with no image subfolders is a
    flat folder of images: one class (id 0) named after the folder. Extensions: IMAGE_EXTENSIONS, any
    case. Hidden files (".*", incl. macOS "._*") are skipped.

    Transform (the paper's recipe): image_to_rgb; shorter side resized to `resolution` with PIL bicubic
    (antialiased); then a random crop (train=True) or centre crop (train=False) of resolution x
    resolution; no flip; float32 (3, H, W) in [-1, 1]. The random crop of item i in epoch e depends only
    on (seed, e, i): call `set_epoch(e)` before each epoch (in the main process, before the DataLoader
    iterator is created: with persistent_workers=True the workers would keep the old epoch).

    A file that fails to open, decode (truncated JPEGs included: PIL's LOAD_TRUNCATED_IMAGES must stay
    False) or convert makes `__getitem__` return None instead of raising; `collate_skip_none` drops
    those items and counts them. `bad_files` (BadFileLog) lists the failures met in this process.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, train: bool, seed: int = 0) -> None:
        if int(resolution) < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = Path(root)
        self.resolution, self.train, self.seed, self.epoch = int(resolution), bool(train), int(seed), 0
        self.class_names, self.samples = self._scan(self.root)
        self.bad_files = BadFileLog()
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated "
                          "images will be padded with grey instead of being skipped", RuntimeWarning, stacklevel=2)

    @staticmethod
    def _scan(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist")
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
        raise FileNotFoundError(
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

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Item `index` in the current epoch; raises on an unreadable file (`__getitem__` does not)."""
        path, label = self.samples[index]
        with Image.open(path) as img:
            img.load()  # decode everything now: truncation and corruption raise here
            rgb = image_to_rgb(img)
        rgb = resize_shorter_side(rgb, self.resolution)
        w, h, size = rgb.width, rgb.height, self.resolution
        if self.train:
            left, top = random_crop_offset(w, h, size, self.seed, self.epoch, index)
        else:
            left, top = center_crop_offset(w, h, size)
        pixels = np.array(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)
        return to_model_range(torch.from_numpy(pixels).permute(2, 0, 1)).contiguous(), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        index = _check_index(index, len(self))
        try:
            return self.load(index)
        except Exception as error:  # noqa: BLE001 - any decoder failure: skip the item, never the epoch
            self.bad_files.record(self.samples[index][0], error)
            return None

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, {len(self)} images, {len(self.class_names)} classes, "
                f"{self.resolution}px, {'random' if self.train else 'centre'} crop)")


class EmojiDataset(Dataset):
    """The bundled emoji (load_emoji) as a Dataset with ImageFolderDataset's item format and interface."""

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = _check_index(index, len(self))
        return to_model_range(self.image_set.images[index]), int(self.image_set.labels[index])

    def __repr__(self) -> str:
        return f"EmojiDataset(split={self.split!r}, {len(self)} images, {self.resolution}px)"


def build_image_dataset(source: str, split: str, resolution: int, seed: int = 0,
                        random_crop: bool | None = None) -> EmojiDataset | ImageFolderDataset:
    """The dataset for `split` of `source`: "emoji" (bundled) or a folder.

    Folders, in this order:
    - `<source>/<split>` exists (ImageNet layout: train/ and val/; "val" also finds validation/): use it;
    - `source` itself is named `split` (e.g. source=/data/imagenet/val, split="val"): use it;
    - `source` has no train/val/validation/test subfolders (a plain ImageFolder tree or a flat folder):
      use it for every split, with a warning for splits other than "train" (they see the same images);
    - otherwise (split folders exist but not the requested one): FileNotFoundError.
    Split "train" gets random crops, any other split centre crops, unless `random_crop` says otherwise
    (pre-tokenization centre-crops the train split: its codes must not depend on a seed). Note
    ImageNet's val folder as distributed is flat (50k JPEGs, no class folders): it loads as one class
    (labels all 0), fine for reconstruction metrics; sort it into class folders if labels matter.
    """
    if source == "emoji":
        return EmojiDataset(split, resolution)
    root = Path(source).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data source {source!r} is neither 'emoji' nor an image folder: {root} {what}")
    all_split_names = [name for names in _SPLIT_FOLDER_NAMES.values() for name in names]
    candidates = _SPLIT_FOLDER_NAMES.get(split, (split,))
    folder = next((root / name for name in candidates if (root / name).is_dir()), None)
    if folder is None and root.name in candidates:
        folder = root
    if folder is None:
        present = [name for name in all_split_names if (root / name).is_dir()]
        if present:
            raise FileNotFoundError(f"no '{split}' folder under {root} (it has split folders {present}; "
                                    f"expected {root / candidates[0]})")
        folder = root
        if split != "train":
            warnings.warn(f"{root} has no '{split}' subfolder: the '{split}' split uses the same images as "
                          f"training (centre-cropped)", stacklevel=2)
    train = split == "train" if random_crop is None else random_crop
    return ImageFolderDataset(folder, resolution, train=train, seed=seed)


class ImageBatch(NamedTuple):
    """A collated batch: unpacks as `images, labels, skipped`."""

    images: torch.Tensor  # float (B, 3, H, W) in [-1, 1]; B may be below the batch size, even 0
    labels: torch.Tensor  # int64 (B,)
    skipped: int  # items of this batch dropped because their file was unreadable


def collate_skip_none(batch: list) -> ImageBatch:
    """Collate (image, label) items, dropping None (unreadable) items and counting them.

    The count travels with the batch, so it is exact whatever the number of DataLoader workers (each
    worker's dataset copy, and its BadFileLog, live in another process): sum `skipped` over batches
    (and over ranks) for the run's total. If every item is bad the batch is empty: images has shape
    (0, 3, 0, 0); the caller must cope (with DDP, every rank must still take part in the step).
    """
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return ImageBatch(torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = default_collate(kept)  # stacks into shared memory inside workers
    return ImageBatch(images, labels.long(), skipped)


class EpochSampler(Sampler[int]):
    """A deterministic permutation per epoch, sharded over ranks, resumable mid-epoch.

    The epoch's order is a permutation of range(n) drawn from (seed, epoch) alone (shuffle=False: the
    identity). Like DistributedSampler it is padded by repeating its head to a multiple of world_size
    (or truncated, drop_last=True) and rank r takes positions r, r + world_size, ... Each rank gets
    `num_per_rank` indices; the first `num_real` of them are real, the rest padding (evaluators can drop
    it). `start_index` skips this rank's first items of the epoch: iterating with start_index=k yields
    exactly the tail [k:] of the uninterrupted order. `set_epoch(e)` resets start_index to 0, so set
    start_index after it when resuming.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, start_index: int = 0) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        world_size = distributed.world_size() if world_size is None else world_size
        rank = distributed.rank() if rank is None else rank
        if n < 0 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"bad sampler arguments: n={n}, rank={rank}, world_size={world_size}, seed={seed}")
        self.num_items, self.shuffle, self.seed = int(n), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.num_per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.total_size = self.num_per_rank * world_size
        self.num_real = len(range(self.rank, min(n, self.total_size), world_size))
        self.epoch = 0
        self.start_index = start_index

    @property
    def start_index(self) -> int:
        return self._start_index

    @start_index.setter
    def start_index(self, value: int) -> None:
        if not 0 <= int(value) <= self.num_per_rank:
            raise ValueError(f"start_index {value} outside [0, {self.num_per_rank}] (this rank's samples per "
                             f"epoch): resuming with another dataset size, batch size or world size?")
        self._start_index = int(value)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.start_index = start_index

    def epoch_order(self) -> np.ndarray:
        """The global order of this epoch before sharding, padded or truncated to total_size."""
        if self.shuffle:
            order = _derived_rng("epoch-permutation", self.seed, self.epoch).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        return np.resize(order, self.total_size)  # repeats the head cyclically when padding

    def rank_indices(self) -> list[int]:
        """This rank's full list for the current epoch, ignoring start_index."""
        return self.epoch_order()[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index:])

    def __len__(self) -> int:
        return self.num_per_rank - self.start_index
