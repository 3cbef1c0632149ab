"""The generator's GAN losses (`generator_adversarial_loss`): each kind against its hand formula, in value and
in gradient, and which kind each tokenizer config selects (docs/DISCRIMINATOR.md)."""
import math
from pathlib import Path

import pytest
import torch

from simvq_common.config import load_config
from simvq_common.errors import ConfigError
from stage1_tokenizer.config import LossConfig, TokenizerTrainConfig
from stage1_tokenizer.losses import GENERATOR_LOSS_KINDS, generator_adversarial_loss

REPO = Path(__file__).resolve().parents[1]
# D's 2x2 patch logits for two images: image 0 has mean logit -0.875, image 1 has 0.625
LOGITS = [[[[-2.0, 0.5], [1.0, -3.0]]], [[[0.0, 2.0], [-1.0, 1.5]]]]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


EXPECTED = {
    "non_saturating_per_patch": (softplus(2.0) + softplus(-0.5) + softplus(-1.0) + softplus(3.0)
                                 + softplus(0.0) + softplus(-2.0) + softplus(1.0) + softplus(-1.5)) / 8,
    "non_saturating_image_mean": (softplus(0.875) + softplus(-0.625)) / 2,
    "hinge": -(-2.0 + 0.5 + 1.0 - 3.0 + 0.0 + 2.0 - 1.0 + 1.5) / 8,
}


def hand_formula(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """The same losses written out logit by logit, for autograd to differentiate independently."""
    images = [[logits[b, 0, i, j] for i in range(2) for j in range(2)] for b in range(2)]
    if kind == "non_saturating_per_patch":
        return sum(torch.log1p(torch.exp(-v)) for image in images for v in image) / 8
    if kind == "non_saturating_image_mean":
        return sum(torch.log1p(torch.exp(-sum(image) / 4)) for image in images) / 2
    return -sum(v for image in images for v in image) / 8


def test_the_kinds_are_exactly_these():
    assert set(GENERATOR_LOSS_KINDS) == set(EXPECTED)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_generator_loss_matches_its_hand_formula_in_value_and_gradient(kind):
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    loss = generator_adversarial_loss(logits, kind)
    assert loss.item() == pytest.approx(EXPECTED[kind], rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    by_hand = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    (expected_grad,) = torch.autograd.grad(hand_formula(kind, by_hand), by_hand)
    assert torch.allclose(grad, expected_grad, rtol=1e-12, atol=0)
    assert (grad < 0).all()  # every kind has G raise D's logits


def test_image_mean_gives_every_patch_of_an_image_the_same_gradient():
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(generator_adversarial_loss(logits, "non_saturating_image_mean"), logits)
    for image, mean_logit in ((0, -0.875), (1, 0.625)):
        sigmoid = 1 / (1 + math.exp(mean_logit))  # of -mean_logit; / 8 = 2 images x 4 patches
        assert torch.allclose(grad[image], torch.full((1, 2, 2), -sigmoid / 8, dtype=torch.float64))
    # the two reductions differ (softplus is not linear): the image mean is the smaller, by Jensen
    assert EXPECTED["non_saturating_image_mean"] < EXPECTED["non_saturating_per_patch"]


@pytest.mark.parametrize("kind", ["non_saturating", "wgan"])
def test_an_unknown_kind_is_a_config_error_naming_the_choices(kind):
    with pytest.raises(ConfigError, match=f"unknown generator loss kind '{kind}'") as error:
        generator_adversarial_loss(torch.zeros(1, 1, 2, 2), kind)
    assert all(choice in str(error.value) for choice in GENERATOR_LOSS_KINDS)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs/tokenizer").glob("*.yaml")))
def test_the_paper_configs_use_the_papers_image_mean_and_the_cpu_ones_say_theirs(config):
    path = REPO / "configs/tokenizer" / config
    assert "gan_kind:" in path.read_text()  # every config says which, never the default by silence
    expected = "non_saturating_image_mean" if config.startswith("imagenet") else "non_saturating_per_patch"
    assert load_config(TokenizerTrainConfig, str(path), []).loss.gan_kind == expected


def test_the_default_keeps_the_per_patch_loss_the_demo_was_trained_with():
    assert LossConfig().gan_kind == "non_saturating_per_patch"
