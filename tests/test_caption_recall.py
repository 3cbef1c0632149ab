"""scripts/caption_recall.py: a drawn image counts for the caption of its nearest train image in pixels."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from image_data.emoji import load_emoji

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "caption_recall.py"
sys.path.insert(0, str(SCRIPT.parent))
from caption_recall import nearest_captions  # noqa: E402


def test_train_images_find_their_own_captions_and_a_nudged_image_its_nearest():
    train = load_emoji("train", 32)
    rows = [train.captions.index(name) for name in ["red heart", "rocket", "pizza", "dog face"]]
    real = train.images[rows].permute(0, 2, 3, 1)  # (N, H, W, 3) as samples.npz holds them
    assert nearest_captions(real, train) == ["red heart", "rocket", "pizza", "dog face"]
    # a blend 70 / 30 of two images is nearer the first: the brute-force distances decide
    blend = (0.7 * real[1].float() + 0.3 * real[2].float()).round().to(torch.uint8)[None]
    distances = ((train.images.permute(0, 2, 3, 1).float() - blend.float()) ** 2).flatten(1).sum(1)
    assert nearest_captions(blend, train) == [train.captions[int(distances.argmin())]] == ["rocket"]
