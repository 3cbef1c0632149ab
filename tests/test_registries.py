"""Kinds are registered, not switched on: no code outside a registry compares a kind's name, and a kind defined in
a test file alone (registered there, no library file touched) builds, trains, saves, loads and round-trips."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from stage1_tokenizer.quantizers import QUANTIZERS, VQ, display_name
from stage1_tokenizer.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("simvq_common", "image_data", "evaluation", "stage1_tokenizer", "stage2_generator", "studies", "pipelines")


def compared_names(path: Path, names: set[str]) -> list[str]:
    """`x == "name"`, `"name" != x`, `x in ("name", ...)`: each such comparison, as file:line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        values = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                  getattr(o, "elts", []) if isinstance(o, (ast.Tuple, ast.List,
                                                                                           ast.Set)) else [])]
        if any(isinstance(v, ast.Constant) and v.value in names for v in values):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_code_outside_the_quantizer_registry_compares_a_quantizer_kind():
    registry = REPO / "stage1_tokenizer" / "quantizers"
    offenders = [hit for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if registry not in path.parents for hit in compared_names(path, set(QUANTIZERS))]
    assert not offenders


def test_the_name_check_catches_a_comparison(tmp_path):
    source = REPO / "tests" / "_probe_compare.py"
    source.write_text('def f(kind):\n    return kind == "ema_vq" or kind in ("x", "vq")\n')
    try:
        assert len(compared_names(source, set(QUANTIZERS))) == 2
    finally:
        source.unlink()


class SignVQ(VQ):
    """A kind defined here alone: plain VQ whose codes are the signs of a learnable codebook's rows, scaled."""

    display_name = "sign VQ"

    def __init__(self, scale: float, **common):
        super().__init__(**common)
        self.scale = scale

    @classmethod
    def from_config(cls, cfg, dim):
        return cls(scale=float(cfg.beta * 4), codebook_size=cfg.codebook_size, dim=dim, beta=cfg.beta)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return weight + (self.scale * torch.sign(weight) - weight).detach()  # straight-through to the weights

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        weight = self.embedding(indices)
        return weight + (self.scale * torch.sign(weight) - weight).detach()


def test_a_quantizer_registered_in_a_test_file_trains_saves_and_round_trips(monkeypatch, tmp_path):
    monkeypatch.setitem(QUANTIZERS, "sign_vq", SignVQ)
    torch.manual_seed(0)
    config = TokenizerConfig(AutoencoderConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4),
                             QuantizerConfig(kind="sign_vq", codebook_size=16, beta=0.5))
    tokenizer = Tokenizer(config)
    assert isinstance(tokenizer.quantizer, SignVQ) and tokenizer.quantizer.scale == 2.0
    assert display_name("sign_vq") == "sign VQ" and display_name("simvq") == "SimVQ"
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    before = tokenizer.quantizer.embedding.weight.detach().clone()
    optimizer = torch.optim.SGD(tokenizer.parameters(), lr=0.1)
    reconstruction, q = tokenizer(images)
    ((reconstruction - images).abs().mean() + q.loss).backward()
    optimizer.step()
    assert not torch.equal(before, tokenizer.quantizer.embedding.weight)  # its codebook trains
    tokenizer.eval()
    codes = tokenizer.encode(images)
    straight_through = tokenizer.quantizer(tokenizer.encoder(images)).quantized  # z + sg(z_q - z): z_q up to rounding
    assert torch.allclose(tokenizer.quantizer.indices_to_codes(codes), straight_through, atol=1e-6)
    assert set(tokenizer.quantizer.codebook().abs().unique().tolist()) == {2.0}
    loaded = Tokenizer.from_pretrained(tokenizer.save_pretrained(tmp_path / "tok"))
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert torch.equal(loaded.decode(loaded.encode(images)), tokenizer.decode(codes))


def test_an_unregistered_quantizer_kind_is_refused_with_the_registered_ones():
    with pytest.raises(Exception, match=r"unknown quantizer kind 'nope': expected one of \['ema_vq', 'simvq', 'vq'\]"):
        Tokenizer(TokenizerConfig(AutoencoderConfig(ch=8, ch_mult=[1], num_res_blocks=1, z_channels=8, norm_groups=4),
                                  QuantizerConfig(kind="nope", codebook_size=16)))
