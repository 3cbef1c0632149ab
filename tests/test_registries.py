"""Kinds are registered, not switched on: no code outside a registry compares a kind's name, and a kind defined in
a test file alone (registered there, no library file touched) builds, trains, saves, loads and round-trips
(quantizers), trains, exports and samples (conditionings) or trains, saves and samples (decoders)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from simvq_common.errors import ConfigError
from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from stage1_tokenizer.quantizers import QUANTIZERS, VQ, display_name
from stage1_tokenizer.tokenizer import Tokenizer
from pipelines.conditionings import REQUESTS
from pipelines.conditionings.class_label import ClassRequests
from stage2_generator.conditionings import CONDITIONINGS, ClassLabel
from stage2_generator.config import GeneratorConfig, SamplingConfig
from stage2_generator.decoders import DECODERS, LlamaDecoder
from stage2_generator.model import Generator
from stage2_generator.sampling import generate

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


@pytest.mark.parametrize("registry,kinds", [("stage1_tokenizer/quantizers", QUANTIZERS),
                                            ("stage2_generator/decoders", DECODERS)])
def test_no_code_outside_a_registry_compares_one_of_its_kinds(registry, kinds):
    offenders = [hit for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if REPO / registry not in path.parents for hit in compared_names(path, set(kinds))]
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


# ---------------------------------------------------------------- conditioning kinds -----------
def conditioning_comparisons(path: Path) -> list[str]:
    """Comparisons of something named *conditioning* or *kind* with a registered kind's name, as file:line."""
    source, found = path.read_text(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = {o.value for o in operands if isinstance(o, ast.Constant)} | {
                e.value for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts
                if isinstance(e, ast.Constant)}
            if names & set(CONDITIONINGS) and any(word in ast.get_source_segment(source, o) for o in operands
                                                  for word in ("conditioning", "kind")):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_code_outside_the_two_conditioning_registries_compares_a_conditioning_kind():
    registries = (REPO / "stage2_generator" / "conditionings", REPO / "pipelines" / "conditionings")
    offenders = [hit for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if not any(r in path.parents for r in registries) for hit in conditioning_comparisons(path)]
    assert not offenders


def test_the_conditioning_check_catches_a_comparison():
    source = REPO / "tests" / "_probe_conditioning.py"
    source.write_text('def f(cfg, kind):\n    return cfg.conditioning == "text" or kind in ("class", "x")\n')
    try:
        assert len(conditioning_comparisons(source)) == 2
    finally:
        source.unlink()


class ClassPair(ClassLabel):
    """A kind defined here alone: the class token followed by a learned 'pair' token (a 2-token prefix)."""

    @classmethod
    def prefix_length(cls, cfg) -> int:
        return 2

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.pair = torch.nn.Parameter(torch.randn(1, 1, cfg.dim))

    def forward(self, condition, drop=None, batch_size=None):
        first = super().forward(condition, drop, batch_size)
        return torch.cat([first, self.pair.expand(len(first), 1, -1)], dim=1)


def test_a_conditioning_registered_in_a_test_file_trains_samples_and_serves(monkeypatch, tmp_path):
    from synthetic_cache import make_cache
    from simvq_common.config import load_config
    from stage2_generator.config import GeneratorTrainConfig, SamplingConfig
    from stage2_generator.model import Generator
    from stage2_generator.sampling import generate
    from stage2_generator.train import train_generator

    monkeypatch.setitem(CONDITIONINGS, "class_pair", ClassPair)
    make_cache(tmp_path / "cache", num_images=20, images_per_shard=8, codebook_size=64, grid=(2, 3))
    cfg = load_config(GeneratorTrainConfig, None, [
        f"data.cache={tmp_path / 'cache'}", "model.size=nano", "model.conditioning=class_pair", "data.batch_size=4",
        "run.steps=3", f"run.out_dir={tmp_path / 'run'}", "run.val_every=100", "run.checkpoint_every=3"])
    generator = Generator.from_pretrained(train_generator(cfg))
    assert isinstance(generator.condition, ClassPair) and generator.prefix_length == 2
    assert not torch.equal(generator.condition.pair, torch.zeros_like(generator.condition.pair))
    labels = torch.tensor([0, 1, 2, 0])
    sampling = SamplingConfig(guidance_scale=2.0, top_k=8, seed=3)
    cached = generate(generator, labels, torch.arange(4), sampling)
    assert torch.equal(cached, generate(generator, labels, torch.arange(4), sampling, use_cache=False))
    assert cached.shape == (4, 6) and int(cached.max()) < 64

    # the jobs' side, registered here too: `simvq sample` and `simvq serve` draw the same images by class name
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    gradio_client = pytest.importorskip("gradio_client")
    from pipelines.config import SampleConfig, ServeConfig
    from pipelines.sample import sample
    from pipelines.serve import launch
    from stage2_generator.config import GeneratorConfig
    from tiny_models import tiny_tokenizer

    monkeypatch.setitem(REQUESTS, "class_pair", ClassRequests())
    tokenizer = tiny_tokenizer(0)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(1)
    model = Generator(GeneratorConfig(size="nano", conditioning="class_pair", codebook_size=64, grid=[4, 4],
                                      num_classes=3, class_names=["ant", "bee", "cat"],
                                      tokenizer_path=str(tmp_path / "tokenizer"),
                                      tokenizer_fingerprint=tokenizer.fingerprint()))
    with torch.no_grad():
        for p in model.parameters():  # every weight random: the head is zero-initialised otherwise
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "pair")
    sampling = SamplingConfig(guidance_scale=2.0, seed=4)
    sample(SampleConfig(generator=str(tmp_path / "pair"), out=str(tmp_path / "cli"), classes=["bee"], num_samples=3,
                        sampling=sampling))
    with np.load(tmp_path / "cli" / "samples.npz") as drawn:
        cli_images, cli_labels = drawn["arr_0"], drawn["labels"]
    codes = generate(model.eval(), torch.tensor([1, 1, 1]), [0, 1, 2], sampling)
    by_hand = ((tokenizer.decode(codes.view(3, 4, 4)) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert cli_labels.tolist() == [1, 1, 1] and np.array_equal(cli_images, by_hand.permute(0, 2, 3, 1).numpy())
    page, url = launch(ServeConfig(generator=str(tmp_path / "pair"), port=0, out=str(tmp_path / "served"),
                                   max_images=4, device="cpu"))
    try:
        client = gradio_client.Client(url, verbose=False, analytics_enabled=False,
                                      download_files=str(tmp_path / "downloads"))
        _, _, files = client.predict("bee", 3, 2.0, "constant", 1.0, 0, 1.0, 4, None, 0, api_name="/sample")
    finally:
        page.close()
    with np.load(next(f for f in files if Path(f).name == "samples.npz")) as served:
        assert np.array_equal(served["arr_0"], cli_images)


def test_an_unregistered_conditioning_is_refused_with_the_registered_ones():
    from stage2_generator.config import GeneratorConfig

    cfg = GeneratorConfig(conditioning="layout", codebook_size=8, grid=[2, 2], num_classes=3)
    with pytest.raises(ConfigError, match=r"model.conditioning='layout': choose one of \('class', 'text', 'none'\)"):
        cfg.check()


class WideLlama(LlamaDecoder):
    """A kind defined here alone: the llama decoder with a feed-forward of 4x the width."""

    @classmethod
    def build(cls, cfg, angles):
        return cls(cfg.dim, cfg.depth, cfg.heads, 4 * cfg.dim, angles.cos(), angles.sin())


def test_a_decoder_registered_in_a_test_file_builds_trains_and_samples(monkeypatch, tmp_path):
    monkeypatch.setitem(DECODERS, "wide-llama", WideLlama)
    cfg = GeneratorConfig(size="nano", decoder="wide-llama", codebook_size=31, grid=[2, 3], num_classes=3)
    torch.manual_seed(0)
    model = Generator(cfg)
    assert model.decoder.blocks[0].down.in_features == 4 * cfg.dim
    codes, labels = torch.randint(0, 31, (4, 6)), torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(codes, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "gen")
    again = Generator.from_pretrained(tmp_path / "gen").eval()
    settings = SamplingConfig(guidance_scale=2.0, top_k=8, seed=1)
    cached = generate(again, labels, range(4), settings)
    assert torch.equal(cached, generate(again, labels, range(4), settings, use_cache=False))
