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


class Stop(Exception):
    """Ends main() once it has built the samples' config."""


def sampler_of(monkeypatch, generator: Path, *sampling: str):
    import caption_recall

    asked = []

    def stop(cfg):
        asked.append(cfg)
        raise Stop
    monkeypatch.setattr(caption_recall, "sample", stop)
    monkeypatch.setattr(sys, "argv", ["caption_recall.py", "--generator", str(generator), "--out", "o",
                                      "--sampling", *sampling])
    try:
        caption_recall.main()
    except Stop:
        pass
    assert asked[0].sampling_preset == "none"  # what --sampling says is what is sampled
    return asked[0].sampling


def test_sampling_flags_win_over_the_generator_s_recommended_settings_even_at_their_defaults(tmp_path, monkeypatch):
    bare, recommending = tmp_path / "bare", tmp_path / "recommending"
    bare.mkdir(), recommending.mkdir()
    (recommending / "sampling.yaml").write_text("temperature: 0.5\ntop_k: 100\nguidance_scale: 2.0\n")
    got = sampler_of(monkeypatch, bare, "temperature=0.5", "top_k=100")
    assert (got.temperature, got.top_k, got.guidance_scale) == (0.5, 100, 1.0)
    got = sampler_of(monkeypatch, recommending, "temperature=1.0")  # the schema default, asked for
    assert (got.temperature, got.top_k, got.guidance_scale) == (1.0, 100, 2.0)
