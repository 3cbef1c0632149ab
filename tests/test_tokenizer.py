"""The tokenizer artifact and its evaluation: directory round trip, fingerprint, decode-from-indices, eval.json."""
import json

import pytest
import torch

from pipelines.cli import main
from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from image_data.emoji import load_emoji
from stage1_tokenizer.tokenizer import Tokenizer
from image_data.transforms import to_model_range

TINY = TokenizerConfig(AutoencoderConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4),
                       QuantizerConfig(kind="simvq", codebook_size=128))


@pytest.fixture
def images():
    return to_model_range(load_emoji("val", 16).images[:6])


def test_directory_round_trip_rebuilds_the_same_model(tmp_path, images):
    torch.manual_seed(0)
    tokenizer = Tokenizer(TINY).eval()
    with torch.no_grad():
        tokenizer.quantizer.basis.weight.mul_(3.0)  # a non-default basis: the lookup must go through it
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "fingerprint.txt").read_text().strip() == tokenizer.fingerprint()
    torch.manual_seed(1)  # a different init must not matter: everything comes from the directory
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    indices = tokenizer.encode(images)
    assert torch.equal(loaded.encode(images), indices)
    assert torch.equal(loaded.decode(indices), tokenizer.decode(indices))
    # decode(indices) decodes the codes forward quantized to (the SimVQ lookup-skips-W trap)
    codes = loaded.quantizer.indices_to_codes(indices)
    expected = loaded.quantizer.basis(loaded.quantizer.frozen_codebook[indices]).permute(0, 3, 1, 2)
    torch.testing.assert_close(codes, expected)


def test_fingerprint_tracks_weights_and_config():
    torch.manual_seed(0)
    a = Tokenizer(TINY)
    torch.manual_seed(0)
    b = Tokenizer(TINY)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.decoder.conv_out.bias[0] += 1e-6
    assert a.fingerprint() != b.fingerprint()
    torch.manual_seed(0)
    c = Tokenizer(TokenizerConfig(TINY.autoencoder, QuantizerConfig(kind="simvq", codebook_size=128, beta=0.5)))
    assert a.fingerprint() != c.fingerprint()  # same weights, different config


def test_from_pretrained_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.slow
def test_eval_tokenizer_writes_metrics_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMVQ_FID_CACHE", str(tmp_path / "fid-cache"))
    torch.manual_seed(0)
    Tokenizer(TINY).save_pretrained(tmp_path / "tok")
    out = tmp_path / "eval.json"
    assert main(["eval-tokenizer", f"tokenizer={tmp_path / 'tok'}", "resolution=16", "max_images=12",
                 "batch_size=5", "perceptual=none", f"out={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 12 and result["skipped_images"] == 0
    assert result["usage"]["tokens"] == 12 * 8 * 8
    assert result["tokenizer_fingerprint"] == (tmp_path / "tok" / "fingerprint.txt").read_text().strip()
    # PSNR is the mean of per-image PSNRs, recomputed here by hand
    tokenizer = Tokenizer.from_pretrained(tmp_path / "tok")
    x = to_model_range(load_emoji("val", 16).images[:12])
    with torch.no_grad():
        recon = tokenizer(x)[0].clamp(-1, 1)
    mse = (recon.double() - x.double()).square().flatten(1).mean(1)
    assert result["psnr"] == pytest.approx(float((10 * torch.log10(4.0 / mse)).mean()), rel=1e-6)
    assert result["lpips"] is None and result["rfid"] > 0
    assert result["conventions"]["rfid"]["num_generated"] == 12
    assert result["conventions"]["rfid"]["weights_sha256"]
    assert (tmp_path / "eval_reconstructions.png").is_file() and (tmp_path / "eval_usage.png").is_file()


def test_eval_tokenizer_requires_a_resolution(tmp_path, capsys):
    assert main(["eval-tokenizer", f"tokenizer={tmp_path}"]) == 2
    assert "set resolution=N" in capsys.readouterr().err
