"""The ready-made models in models/ (simvq_common/ready_made.py): each loads by its short name, offline, with the
fingerprint its folder records; the generators find their tokenizer by name and sample from their recommended
settings; together they stay within the repository's 16 MiB budget."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.classifier import ImageClassifier
from evaluation.memorisation import nearest
from image_data.emoji import load_emoji
from pipelines.config import SampleConfig
from pipelines.sample import sample
from simvq_common.config import load_config
from simvq_common.hub import resolve_model_dir
from simvq_common.ready_made import MODELS_DIR, READY_MADE, ready_made_dir
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.config import RECOMMENDED_SAMPLING, SamplingConfig
from stage2_generator.model import Generator

LOADERS = {"tokenizer": Tokenizer, "generator": Generator, "classifier": ImageClassifier}


def test_the_ready_made_models_fit_the_budget():
    total = sum(f.stat().st_size for name in READY_MADE for f in (MODELS_DIR / READY_MADE[name]).iterdir())
    assert total <= 16 * 2**20, f"{total / 2**20:.2f} MiB"


@pytest.mark.parametrize("name", sorted(READY_MADE))
def test_a_ready_made_model_loads_by_name_with_its_recorded_fingerprint(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh place: the name alone finds it
    directory = resolve_model_dir(name)
    assert directory == ready_made_dir(name) and directory.parent == MODELS_DIR
    kind = (directory / "kind.txt").read_text().strip()
    model = LOADERS[kind].from_pretrained(name)
    assert model.fingerprint() == (directory / "fingerprint.txt").read_text().strip()
    assert (directory / "README.md").read_text().count(model.fingerprint()) >= 1
    if kind == "generator":
        assert model.config.tokenizer_path == "emoji-tokenizer"
        assert Tokenizer.from_pretrained("emoji-tokenizer").fingerprint() == model.config.tokenizer_fingerprint
        assert (directory / RECOMMENDED_SAMPLING).is_file()


def test_a_local_directory_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emoji-class").mkdir()
    assert ready_made_dir("emoji-class") is None and resolve_model_dir("emoji-class").name == "emoji-class"


@pytest.mark.parametrize("name, given", [("emoji-class", {"per_class": 1}),
                                         ("emoji-text", {"prompts": ["red heart", "rocket"], "per_prompt": 1})])
def test_the_ready_made_generators_sample_from_their_recommended_settings(name, given, tmp_path):
    recommended = load_config(SamplingConfig, resolve_model_dir(name) / RECOMMENDED_SAMPLING)
    summary = sample(SampleConfig(generator=name, out=str(tmp_path / "s"), **given))
    meta = json.loads((tmp_path / "s" / "sampling.json").read_text())
    assert meta["config"]["sampling"] == {**meta["config"]["sampling"],
                                          **{k: v for k, v in vars(recommended).items()}}
    with np.load(tmp_path / "s" / "samples.npz") as data:
        images = data["arr_0"]
    assert images.shape == (summary["num_samples"], 32, 32, 3) and images.std() > 5  # not one flat colour
    # an explicit setting wins over the recommended one
    sample(SampleConfig(generator=name, out=str(tmp_path / "t"), sampling=SamplingConfig(guidance_scale=3.5),
                        **given))
    assert json.loads((tmp_path / "t" / "sampling.json").read_text())["config"]["sampling"]["guidance_scale"] == 3.5


def test_the_ready_made_text_generator_draws_the_emoji_its_prompt_names(tmp_path):
    """A caption names one train image and emoji-text learned the pairs by heart: at its recommended settings a
    prompt's samples lie nearer (in pixels) to the train image of that name than to any other train image."""
    prompts = ["red heart", "rocket", "pizza"]
    sample(SampleConfig(generator="emoji-text", out=str(tmp_path / "s"), prompts=prompts, per_prompt=2))
    with np.load(tmp_path / "s" / "samples.npz") as data:
        drawn, asked = torch.from_numpy(data["arr_0"]).float().flatten(1), [str(p) for p in data["prompts"]]
    assert sorted(asked) == sorted(prompts * 2)
    train = load_emoji("train", 32)
    _, index = nearest(drawn, train.images.permute(0, 2, 3, 1).float().flatten(1))
    assert [train.captions[int(i)] for i in index] == asked


def test_the_classifier_ships_with_its_val_accuracy():
    report = json.loads((ready_made_dir("emoji-classifier") / "eval.json").read_text())
    assert 0.5 < report["val"]["accuracy"] <= 1 and len(report["class_names"]) == 9
    assert torch.is_tensor(next(ImageClassifier.from_pretrained("emoji-classifier").parameters()))
