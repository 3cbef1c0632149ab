"""Stage-1 losses: perceptual backends (real weights or a clear error), PatchGAN, D hinge loss, adaptive weight
(the generator's GAN losses: test_gan_loss.py)."""
import socket
import urllib.error
from pathlib import Path

import pytest
import torch

from image_data.emoji import load_emoji
from stage1_tokenizer.losses import PatchDiscriminator, adaptive_generator_weight, gan_weight_at, hinge_d_loss
from stage1_tokenizer.perceptual import PERCEPTUAL_BACKENDS, PerceptualBackendUnavailable, build_perceptual_loss
from image_data.transforms import to_model_range

# torchvision VGG16 `features` conv layers: (index in features, in channels, out channels)
VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512)]


# ---------------------------------------------------------------------------------------------- stlpips


@pytest.fixture(scope="module")
def stlpips():
    return build_perceptual_loss("stlpips-vgg")


def test_stlpips_weights_are_the_shipped_ones_not_random(stlpips):
    torch.manual_seed(1234)  # a random init would now differ from the fixture's
    other = build_perceptual_loss("stlpips-vgg")
    a, b = stlpips.net.state_dict(), other.net.state_dict()
    assert a.keys() == b.keys() and len(a) > 30
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and they are exactly the tensors in the package's weight file
    prov = stlpips.provenance
    assert prov["backend"] == "stlpips-vgg" and prov["package"] == "stlpips-pytorch"
    assert prov["package_version"] == "0.0.2" and prov["variant"] == "shift_tolerant"
    shipped = torch.load(prov["weights_file"], map_location="cpu", weights_only=True)
    assert "stlpips_pytorch" in prov["weights_file"] and len(prov["weights_sha256"]) == 64
    n_conv = 0
    for key, value in shipped.items():
        assert torch.equal(a[key], value), key
        n_conv += key.startswith("net.") and key.endswith(".weight") and value.ndim == 4 and value.shape[2] == 3
    assert n_conv == 13  # all 13 VGG16 3x3 convs come from the file
    # trained LPIPS heads are non-negative (a random init has both signs)
    assert all((a[f"lin{i}.model.1.weight"] >= 0).all() for i in range(5))


def test_stlpips_is_frozen_in_eval_and_stays_so(stlpips):
    assert not stlpips.training and not any(m.training for m in stlpips.modules())
    assert all(not p.requires_grad for p in stlpips.parameters())
    torch.nn.Sequential(stlpips).train()  # a parent switching to train mode must not enable LPIPS dropout
    assert not any(m.training for m in stlpips.modules())


def test_stlpips_distances_on_real_images_and_gradients(stlpips):
    x = to_model_range(load_emoji("val", 64).images[:3])
    gen = torch.Generator().manual_seed(0)
    mild = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    strong = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    first = torch.cat([x, mild, strong]).requires_grad_(True)
    d = stlpips(first, torch.cat([x, x, x]))
    assert d.shape == (9,) and d.dtype == torch.float32
    d_same, d_mild, d_strong = d.detach().view(3, 3)
    assert d_same.abs().max() < 1e-6
    assert (d_mild > 0.01).all() and (d_strong > d_mild + 0.1).all()
    assert d_strong.max() < 2.0  # LPIPS-scale values, not exploding
    d.sum().backward()
    grad = first.grad.view(3, 3, *x.shape[1:])
    assert torch.isfinite(grad).all()
    assert grad[1:].abs().sum() > 0  # differentiable w.r.t. the distorted images
    assert all(p.grad is None for p in stlpips.parameters())


def test_stlpips_runs_in_fp32_under_autocast(stlpips):
    x = to_model_range(load_emoji("val", 32).images[:2])
    y = x.flip(-1)
    ref = stlpips(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = stlpips(x, y)
    assert d.dtype == torch.float32 and torch.allclose(d, ref)


# ---------------------------------------------------------------------------------------------- lpips-vgg


def _hub_vgg16() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"


def _online() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
        return True
    except OSError:
        return False


def _assert_names_alternatives(err: Exception):
    msg = str(err)
    assert "stlpips-vgg" in msg and "'none'" in msg and "weights_path" in msg


@pytest.mark.skipif(_hub_vgg16().is_file(), reason="the VGG16 weights are in the torch hub cache")
def test_lpips_vgg_offline_raises_naming_alternatives():
    if _online():
        pytest.skip("online: this would download the 528 MB VGG16 checkpoint")
    with pytest.raises(PerceptualBackendUnavailable) as err:
        build_perceptual_loss("lpips-vgg")
    _assert_names_alternatives(err.value)
    assert isinstance(err.value, RuntimeError)


def test_lpips_vgg_failed_download_raises(monkeypatch, tmp_path):
    # hermetic: empty hub cache, the download fails as it does offline
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(PerceptualBackendUnavailable) as err:
        build_perceptual_loss("lpips-vgg")
    _assert_names_alternatives(err.value)
    assert "no network" in str(err.value)
    with pytest.raises(PerceptualBackendUnavailable, match="downloads are disabled"):
        build_perceptual_loss("lpips-vgg", allow_download=False)


def test_lpips_vgg_wrong_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(PerceptualBackendUnavailable, match="does not exist") as err:
        build_perceptual_loss("lpips-vgg", weights_path=str(tmp_path / "missing.pth"))
    _assert_names_alternatives(err.value)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(PerceptualBackendUnavailable, match="cannot read"):
        build_perceptual_loss("lpips-vgg", weights_path=str(text))
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(PerceptualBackendUnavailable, match="not a torchvision VGG16 state dict"):
        build_perceptual_loss("lpips-vgg", weights_path=str(other))


@pytest.fixture(scope="module")
def fake_vgg16_features():
    gen = torch.Generator().manual_seed(0)
    state = {}
    for index, c_in, c_out in VGG16_CONVS:
        state[f"features.{index}.weight"] = 0.05 * torch.randn(c_out, c_in, 3, 3, generator=gen)
        state[f"features.{index}.bias"] = 0.05 * torch.randn(c_out, generator=gen)
    return state


def test_lpips_vgg_loads_a_local_vgg16_into_the_trunk(tmp_path, fake_vgg16_features):
    path = tmp_path / "my_vgg16.pth"
    torch.save(fake_vgg16_features, path)
    loss = build_perceptual_loss("lpips-vgg", weights_path=str(path))
    own = loss.net.net.state_dict()
    assert len(own) == 2 * len(VGG16_CONVS)
    for key, value in own.items():  # slice<k>.<i>.weight <- features.<i>.weight
        assert torch.equal(value, fake_vgg16_features["features." + key.split(".", 1)[1]]), key
    prov = loss.provenance
    assert prov["backend"] == "lpips-vgg" and prov["backbone_source"] == "weights_path"
    assert prov["backbone_file"] == str(path) and prov["package_version"] == "0.1.4"
    assert not loss.training and all(not p.requires_grad for p in loss.parameters())
    x = to_model_range(load_emoji("val", 32).images[:2])
    d = loss(x, torch.cat([x[:1], x[:1]]))
    assert d.shape == (2,) and d[0].abs() < 1e-6 and d[1] > 0

    # a file named like torchvision's checkpoint must match the sha256 prefix in its name
    misnamed = tmp_path / "vgg16-397923af.pth"
    torch.save(fake_vgg16_features, misnamed)
    with pytest.raises(PerceptualBackendUnavailable, match="sha256 prefix"):
        build_perceptual_loss("lpips-vgg", weights_path=str(misnamed))


def test_none_and_unknown_backends():
    assert build_perceptual_loss("none") is None
    with pytest.raises(ValueError) as err:
        build_perceptual_loss("lpips-alex")
    assert all(name in str(err.value) for name in PERCEPTUAL_BACKENDS)


# ---------------------------------------------------------------------------------------------- PatchGAN


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 * 1 - 4) // stride + 1  # kernel 4, padding 1


@pytest.mark.parametrize("resolution", [64, 128])
def test_patch_discriminator_output_size(resolution):
    size = resolution
    for stride in (2, 2, 2, 1, 1):  # 3 stride-2 convs, the stride-1 block, the final conv
        size = _conv_out(size, stride)
    assert size == {64: 6, 128: 14}[resolution]
    disc = PatchDiscriminator()
    out = disc(torch.randn(2, 3, resolution, resolution))
    assert out.shape == (2, 1, size, size)


def test_patch_discriminator_parameter_count():
    k = 4 * 4
    expected = (3 * 64 * k + 64            # conv 3->64 with bias
                + 64 * 128 * k + 2 * 128   # conv 64->128 no bias + norm scale/shift
                + 128 * 256 * k + 2 * 256  # conv 128->256 + norm
                + 256 * 512 * k + 2 * 512  # stride-1 conv 256->512 + norm
                + 512 * 1 * k + 1)         # conv 512->1 with bias
    assert expected == 2_765_633
    disc = PatchDiscriminator(in_channels=3, ndf=64, n_layers=3)
    assert sum(p.numel() for p in disc.parameters()) == expected


def test_patch_discriminator_init_statistics():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    for conv in convs:
        assert abs(conv.weight.std().item() - 0.02) < 0.002
        assert abs(conv.weight.mean().item()) < 0.002
        if conv.bias is not None:
            assert torch.all(conv.bias == 0)
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    scales = torch.cat([n.weight.detach() for n in norms])  # 128 + 256 + 512 values
    assert abs(scales.mean().item() - 1.0) < 0.005 and 0.015 < scales.std().item() < 0.025
    assert all(torch.all(n.bias == 0) for n in norms)


# ---------------------------------------------------------------------------------------------- GAN losses


def test_hinge_d_loss_values_and_gradient_signs():
    real = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    fake = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    # relu(1 - real) = [0, 0.5, 2] -> mean 2.5/3; relu(1 + fake) = [0, 1, 2.5] -> mean 3.5/3
    loss = hinge_d_loss(real, fake)
    assert loss.item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3)) and loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.allclose(real.grad, torch.tensor([0.0, -0.5 / 3, -0.5 / 3]))  # push reals above 1
    assert torch.allclose(fake.grad, torch.tensor([0.0, 0.5 / 3, 0.5 / 3]))    # push fakes below -1
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0


def test_adaptive_generator_weight_matches_hand_computation():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[3.0, 4.0]])
    out = layer(x)                      # 1*3 + 2*4 = 11
    rec = ((out - 1.0) ** 2).sum()      # d/dW = 2 * 10 * [3, 4] = [60, 80], norm 100
    g = -0.5 * out.sum()                # d/dW = -0.5 * [3, 4], norm 2.5
    w = adaptive_generator_weight(rec, g, layer.weight)
    assert w.item() == pytest.approx(100.0 / (2.5 + 1e-4), rel=1e-6)
    assert not w.requires_grad and layer.weight.grad is None
    assert adaptive_generator_weight(rec, g, layer.weight, max_weight=10.0).item() == 10.0
    # a vanishing GAN gradient hits the default clamp 1e4 (100 / 1e-4 = 1e6 unclamped)
    assert adaptive_generator_weight(rec, 0.0 * out.sum(), layer.weight).item() == pytest.approx(1e4)
    rec.backward()  # graphs were retained
    assert torch.allclose(layer.weight.grad, torch.tensor([[60.0, 80.0]]))


def test_gan_weight_schedule():
    assert [gan_weight_at(s, 3, 0.1) for s in (0, 2, 3, 10)] == [0.0, 0.0, 0.1, 0.1]
    assert gan_weight_at(0, 0, 0.1) == 0.1  # the paper: GAN from step 0
