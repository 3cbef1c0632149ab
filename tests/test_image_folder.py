"""ImageFolderDataset / EmojiDataset / build_image_dataset / collate_skip_none / EpochSampler."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from image_data.datasets import build_image_dataset
from image_data.emoji import EmojiDataset, load_emoji
from image_data.image_folder import BadImageWarning, ImageFolderDataset
from image_data.loading import EpochSampler, collate_skip_none
from image_data.transforms import random_crop_offset, to_model_range


def model_value(v: float) -> float:
    return v / 127.5 - 1.0


def column_ramp(w: int, h: int, step: int) -> Image.Image:
    """RGB image whose column j has value step * j in every channel and row."""
    row = (np.arange(w) * step).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (h, 1))[:, :, None], 3, axis=2), "RGB")


def single(tmp_path: Path, img: Image.Image, name: str, resolution: int, train: bool = False, **save):
    folder = tmp_path / name.split(".")[0]
    folder.mkdir()
    img.save(folder / name, **save)
    ds = ImageFolderDataset(folder, resolution, train=train)
    assert len(ds) == 1 and ds.class_names == [folder.name]
    return ds[0]


# ---------------------------------------------------------------- conversion to RGB ------------
def test_rgba_transparency_becomes_white_and_opaque_pixels_are_exact(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 4:] = (10, 20, 30, 255)  # opaque
    rgba[0, 7] = (0, 0, 0, 128)  # half-transparent black over white -> ~127
    image, label = single(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png", 8)
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and label == 0
    assert (image[:, :, :4] == 1.0).all()
    assert torch.equal(image[:, 1:, 4:], to_model_range(torch.tensor([10, 20, 30]).view(3, 1, 1).expand(3, 7, 4)))
    assert image[:, 0, 7].sub(model_value(127)).abs().max() <= 1 / 127.5 + 1e-6


def test_grey_palette_la_16bit_and_cmyk_become_rgb(tmp_path):
    grey = np.full((6, 6), 100, np.uint8)
    image, _ = single(tmp_path, Image.fromarray(grey, "L"), "grey.png", 6)
    assert torch.allclose(image, torch.full((3, 6, 6), model_value(100)))

    pal = Image.fromarray(np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], np.uint8), "P")
    pal.putpalette([9, 9, 9, 200, 50, 25] + [0] * 762)
    image, _ = single(tmp_path, pal, "pal.png", 3, transparency=0)  # index 0 transparent -> white
    assert (image[:, [0, 1, 2], [0, 1, 2]] == 1.0).all()
    assert torch.allclose(image[:, 0, 1], torch.tensor([model_value(200), model_value(50), model_value(25)]))

    la = Image.merge("LA", [Image.new("L", (4, 4), 50), Image.fromarray(np.array([[0, 255] * 2] * 4, np.uint8))])
    image, _ = single(tmp_path, la, "la.png", 4)
    assert (image[:, :, 0::2] == 1.0).all() and torch.allclose(image[:, :, 1::2], torch.tensor(model_value(50)))

    sixteen = np.array([[0, 65535], [25700, 257 * 200]], np.uint16).repeat(2, 0).repeat(2, 1)
    img16 = Image.fromarray(sixteen)
    assert img16.mode.startswith("I;16")
    image, _ = single(tmp_path, img16, "sixteen.png", 4)
    expected = torch.tensor([[0, 255], [100, 200]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(image, to_model_range(expected).expand(3, 4, 4))

    cmyk = np.zeros((4, 4, 4), np.uint8)
    cmyk[:, 2:, 3] = 255  # K = 255 -> black; no ink -> white
    image, _ = single(tmp_path, Image.fromarray(cmyk, "CMYK"), "cmyk.tiff", 4)
    assert (image[:, :, :2] == 1.0).all() and (image[:, :, 2:] == -1.0).all()


# ---------------------------------------------------------------- geometry ---------------------
def test_center_crop_keeps_the_middle_columns_and_rows(tmp_path):
    wide, _ = single(tmp_path, column_ramp(40, 20, 6), "wide.png", 20)
    assert torch.equal(wide, to_model_range((torch.arange(10, 30) * 6).expand(3, 20, 20)))  # columns 10..29
    tall, _ = single(tmp_path, column_ramp(40, 20, 6).transpose(Image.Transpose.TRANSPOSE), "tall.png", 20)
    assert torch.equal(tall, to_model_range((torch.arange(10, 30) * 6).view(20, 1).expand(3, 20, 20)))


def test_shorter_side_resize_then_center_crop(tmp_path):
    # 80x40 with column value 2j -> 40x20 (bicubic, antialiased): column k ~ 2 * (2k + 0.5) = 4k + 1;
    # the centre crop keeps resized columns 10..29, i.e. 4c + 41 for output column c
    image, _ = single(tmp_path, column_ramp(80, 40, 2), "big.png", 20)
    assert image.shape == (3, 20, 20)
    assert (image == image[:, :1, :]).all()  # rows still identical
    assert image.add(1).mul(127.5).sub((4 * torch.arange(20) + 41).float()).abs().max() <= 1.0


# ---------------------------------------------------------------- random crops -----------------
def test_random_crop_depends_only_on_seed_epoch_and_index(tmp_path):
    folder = tmp_path / "ramps"
    folder.mkdir()
    for i in range(4):
        column_ramp(40, 20, 6).save(folder / f"{i}.png")

    def lefts(seed: int, epoch: int) -> list[int]:
        ds = ImageFolderDataset(folder, 20, train=True, seed=seed)
        ds.set_epoch(epoch)
        torch.manual_seed(epoch)  # the global RNGs must not matter
        np.random.seed(epoch + 1)
        out = []
        for i in range(len(ds)):
            image, _ = ds[i]
            left = int(round((float(image[0, 0, 0]) + 1) * 127.5 / 6))
            assert torch.equal(image, to_model_range((torch.arange(left, left + 20) * 6).expand(3, 20, 20)))
            assert (left, 0) == random_crop_offset(40, 20, 20, seed, epoch, i)
            out.append(left)
        return out

    assert lefts(seed=0, epoch=3) == lefts(seed=0, epoch=3)
    per_epoch = [lefts(seed=0, epoch=e) for e in range(4)]
    assert len({tuple(x) for x in per_epoch}) == 4  # the crops change across epochs
    assert len({x for epoch in per_epoch for x in epoch}) > 5  # ... and across items
    assert lefts(seed=1, epoch=0) != per_epoch[0]
    offsets = [random_crop_offset(40, 20, 20, 0, e, 0)[0] for e in range(300)]
    assert min(offsets) == 0 and max(offsets) == 20 and len(set(offsets)) == 21


# ---------------------------------------------------------------- bad files --------------------
@pytest.fixture
def tree_with_bad_files(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(root / "a" / "good1.jpg", quality=95)
    column_ramp(20, 20, 6).save(root / "a" / "good2.PNG")
    data = (root / "a" / "good1.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "b" / "garbage.jpg").write_text("this is not an image\n" * 20)
    (root / "b" / "empty.jpg").write_bytes(b"")
    noise.save(root / "b" / "good3.jpg")
    bad = {str(root / "b" / name) for name in ("truncated.jpg", "garbage.jpg", "empty.jpg")}
    return root, bad


def test_corrupt_files_are_skipped_warned_once_and_counted(tree_with_bad_files):
    root, bad = tree_with_bad_files
    ds = ImageFolderDataset(root, 16, train=False)
    assert len(ds) == 6 and ds.class_names == ["a", "b"]
    with pytest.warns(BadImageWarning) as caught:
        items = [ds[i] for i in range(len(ds))]
    assert {p for (p, _), item in zip(ds.samples, items) if item is None} == bad
    assert all(item[0].shape == (3, 16, 16) for item in items if item is not None)
    assert len(caught) == 3 and all(any(p in str(w.message) for p in bad) for w in caught)
    assert set(ds.bad_files.paths) == bad and ds.bad_files.skipped == 3
    assert "truncated" in ds.bad_files.errors[str(root / "b" / "truncated.jpg")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read of a known bad file counts but does not warn again
        assert ds[3] is None
    assert ds.bad_files.skipped == 4 and len(ds.bad_files) == 3

    for workers in (0, 2):
        fresh = ImageFolderDataset(root, 16, train=True)
        loader = DataLoader(fresh, batch_size=4, num_workers=workers, collate_fn=collate_skip_none)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadImageWarning)
            batches = list(loader)
        assert sum(b.skipped for b in batches) == 3, workers
        assert sum(len(b.images) for b in batches) == 3
        # sorted: a/good1, a/good2, b/empty, b/garbage | b/good3, b/truncated
        assert [b.labels.tolist() for b in batches] == [[0, 0], [1]]
        assert all(b.images.shape[1:] == (3, 16, 16) for b in batches)
        # the main process's log only sees what ran in the main process
        assert fresh.bad_files.skipped == (3 if workers == 0 else 0)


def test_collate_of_an_all_bad_batch_is_empty():
    batch = collate_skip_none([None, None])
    images, labels, skipped = batch
    assert images.shape == (0, 3, 0, 0) and labels.shape == (0,) and skipped == 2
    good = collate_skip_none([(torch.zeros(3, 2, 2), 1), None, (torch.ones(3, 2, 2), 4)])
    assert good.images.shape == (2, 3, 2, 2) and good.labels.tolist() == [1, 4] and good.labels.dtype == torch.long
    assert good.skipped == 1


# ---------------------------------------------------------------- layout -----------------------
def test_class_labels_follow_sorted_subfolders_and_files_are_sorted(tmp_path):
    root = tmp_path / "tree"
    for cls, names in {"zebra": ["b.jpg", "a.JPEG"], "apple": ["x.png"], "mango": ["2.webp", "1.bmp"]}.items():
        (root / cls).mkdir(parents=True)
        for name in names:
            column_ramp(8, 8, 1).save(root / cls / name)
    (root / "mango" / "nested").mkdir()
    column_ramp(8, 8, 1).save(root / "mango" / "nested" / "0.gif")
    (root / "mango" / "notes.txt").write_text("not an image")
    (root / "mango" / "._1.bmp").write_bytes(b"macOS resource fork")
    (root / ".hidden").mkdir()
    column_ramp(8, 8, 1).save(root / ".hidden" / "h.png")
    (root / "empty_class").mkdir()
    with pytest.warns(UserWarning, match="empty_class"):
        ds = ImageFolderDataset(root, 8, train=False)
    assert ds.class_names == ["apple", "mango", "zebra"]
    assert [(Path(p).relative_to(root).as_posix(), label) for p, label in ds.samples] == [
        ("apple/x.png", 0), ("mango/1.bmp", 1), ("mango/2.webp", 1), ("mango/nested/0.gif", 1),
        ("zebra/a.JPEG", 2), ("zebra/b.jpg", 2)]
    assert [ds[i][1] for i in range(len(ds))] == ds.labels == [0, 1, 1, 1, 2, 2]

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.png", "a.tif", "c.jpeg"):
        column_ramp(8, 8, 1).save(flat / name)
    ds = ImageFolderDataset(flat, 8, train=True)
    assert ds.class_names == ["flat"] and [Path(p).name for p, _ in ds.samples] == ["a.tif", "b.png", "c.jpeg"]
    assert ds.labels == [0, 0, 0]
    with pytest.raises(IndexError):
        ds[3]


def test_missing_or_empty_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8, train=True)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*empty.*expected class subfolders"):
        ImageFolderDataset(empty, 8, train=True)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_image_dataset(str(tmp_path / "nope"), "train", 8, 0)


def test_build_image_dataset_resolves_imagenet_layout_and_plain_folders(tmp_path):
    root = tmp_path / "imagenet"
    for split, cls in (("train", "n01"), ("train", "n02"), ("val", "n01"), ("val", "n02")):
        (root / split / cls).mkdir(parents=True)
        column_ramp(40, 20, 6).save(root / split / cls / "img.png")
    train = build_image_dataset(str(root), "train", 20, seed=5)
    val = build_image_dataset(str(root), "val", 20, seed=5)
    assert isinstance(train, ImageFolderDataset) and train.root == root / "train" and train.train and train.seed == 5
    assert val.root == root / "val" and not val.train and val.class_names == train.class_names == ["n01", "n02"]
    assert build_image_dataset(str(root / "val"), "val", 20, 0).root == root / "val"  # pointed at the split
    with pytest.raises(FileNotFoundError, match="no 'test' folder"):
        build_image_dataset(str(root), "test", 20, 0)

    plain = root / "train"  # a plain class tree: train on it; val falls back to it with a warning
    assert build_image_dataset(str(plain / "n01"), "train", 20, 0).root == plain / "n01"
    with pytest.warns(UserWarning, match="same images as training"):
        fallback = build_image_dataset(str(plain / "n01"), "val", 20, 0)
    assert not fallback.train


def test_emoji_dataset_has_the_same_item_format():
    ds = build_image_dataset("emoji", "val", 32, seed=0)
    ref = load_emoji("val", 32)
    assert isinstance(ds, EmojiDataset) and len(ds) == len(ref) and ds.class_names == ref.class_names
    ds.set_epoch(3)
    image, label = ds[5]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert torch.equal(image, to_model_range(ref.images[5])) and label == int(ref.labels[5])
    batch = collate_skip_none([ds[0], ds[1]])
    assert batch.images.shape == (2, 3, 32, 32) and batch.skipped == 0


# ---------------------------------------------------------------- sampler ----------------------
def test_sampler_is_a_deterministic_permutation_per_epoch():
    def order(seed, epoch):
        sampler = EpochSampler(50, seed=seed, rank=0, world_size=1)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(50))
    assert order(0, 0) == order(0, 0) and order(0, 0) != order(0, 1)
    assert order(0, 1) != order(1, 0)  # (seed, epoch) pairs do not collide like seed + epoch would
    torch.manual_seed(123)
    np.random.seed(123)
    assert order(7, 2) == order(7, 2)
    assert list(EpochSampler(5, shuffle=False, rank=0, world_size=1)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (7, 8), (11, 1)])
def test_rank_shards_cover_every_index_once_up_to_padding(n, world):
    samplers = [EpochSampler(n, seed=3, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    lists = [list(s) for s in samplers]
    per_rank = -(-n // world)
    assert all(len(x) == len(s) == per_rank for x, s in zip(lists, samplers))
    real = [i for x, s in zip(lists, samplers) for i in x[: s.num_real]]
    assert sorted(real) == list(range(n))  # the real parts partition the dataset
    padding = [i for x, s in zip(lists, samplers) for i in x[s.num_real:]]
    assert len(padding) == per_rank * world - n
    order = samplers[0].epoch_order()
    assert padding == [] or sorted(padding) == sorted(order[: len(padding)].tolist())  # head repeated
    interleaved = [lists[p % world][p // world] for p in range(per_rank * world)]
    assert interleaved == order.tolist()

    dropped = [EpochSampler(n, seed=3, rank=r, world_size=world, drop_last=True) for r in range(world)]
    flat = [i for s in dropped for i in s]
    assert len(flat) == len(set(flat)) == (n // world) * world


def test_start_index_resumes_with_the_tail_of_the_uninterrupted_order():
    sampler = EpochSampler(23, seed=11, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    for k in range(len(full) + 1):
        resumed = EpochSampler(23, seed=11, rank=1, world_size=2)
        resumed.set_epoch(4)
        resumed.start_index = k
        assert list(resumed) == full[k:] and len(resumed) == len(full) - k
    resumed.set_epoch(5)  # a new epoch starts from its beginning
    assert resumed.start_index == 0 and len(list(resumed)) == len(full)
    with pytest.raises(ValueError, match="start_index"):
        resumed.start_index = len(full) + 1


def test_mid_epoch_resume_through_a_dataloader_is_bit_exact(tmp_path):
    folder = tmp_path / "imgs"
    for cls in ("x", "y"):
        (folder / cls).mkdir(parents=True)
        for i in range(5):
            column_ramp(40, 24, 6).rotate(90 * i, expand=True).save(folder / cls / f"{i}.png")

    def run(start_batch: int, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ds = ImageFolderDataset(folder, 16, train=True, seed=9)
        sampler = EpochSampler(len(ds), seed=9, rank=0, world_size=1)
        ds.set_epoch(1)
        sampler.set_epoch(1)
        sampler.start_index = start_batch * 3
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=collate_skip_none,
                            drop_last=True)
        return [(b.images, b.labels) for b in loader]

    full = run(0, 0)
    torch.manual_seed(999)  # a resumed process has a different global RNG state
    resumed = run(2, 2)
    assert len(full) == 3 and len(resumed) == 1
    assert torch.equal(resumed[0][0], full[2][0]) and torch.equal(resumed[0][1], full[2][1])
