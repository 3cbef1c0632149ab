import pytest
import torch

from stage1_tokenizer.emoji import load_emoji
from stage1_tokenizer.transforms import to_model_range, to_uint8


def test_emoji_splits_are_disjoint_stratified_and_complete():
    train, val, everything = load_emoji("train"), load_emoji("val"), load_emoji("all")
    assert len(train) + len(val) == len(everything) == 3781
    assert len(train.class_names) == 9 and "Component" not in train.class_names
    # every category has ~10% of its images in val
    for c in range(9):
        n_val, n_all = int((val.labels == c).sum()), int((everything.labels == c).sum())
        assert n_val == max(1, round(0.1 * n_all))
    # disjoint: no val caption+image pair appears in train
    train_keys = {(cap, img.numpy().tobytes()) for cap, img in zip(train.captions, train.images)}
    assert not any((cap, img.numpy().tobytes()) in train_keys for cap, img in zip(val.captions, val.images))


def test_emoji_images_are_composited_on_white():
    images = load_emoji("all").images
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
    corners = images[:, :, 0, 0].float()
    assert (corners == 255).all(dim=1).float().mean() > 0.9  # transparent corners became white


def test_downsampled_resolution_is_the_block_mean():
    full, small = load_emoji("val", 64), load_emoji("val", 32)
    assert small.images.shape[1:] == (3, 32, 32)
    block_mean = full.images.float().reshape(-1, 3, 32, 2, 32, 2).mean((3, 5))
    assert torch.equal(small.images, block_mean.round().to(torch.uint8))


def test_captions_and_labels_line_up():
    s = load_emoji("all")
    i = s.captions.index("grinning face")
    assert s.class_names[int(s.labels[i])] == "Smileys & Emotion"


def test_range_conversions_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.equal(to_uint8(y), x)


@pytest.mark.parametrize("kwargs, message", [({"split": "test"}, "unknown split"), ({"resolution": 128}, "resolution")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_emoji(**kwargs)
