"""Weights stored in fp16 or int8 (simvq_common/weight_storage.py): int8 against a brute-force row-wise absmax
quantizer, model directories that load with the fingerprint they record, and a file missing its scales refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from simvq_common.errors import ArtifactError
from simvq_common.pretrained import model_fingerprint
from simvq_common.weight_storage import INT8_MIN_ELEMENTS, decode, encode
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.model import Generator
from test_generator_model import condition_for, config, random_model
from test_tokenizer import TINY


def brute_force_int8(w: torch.Tensor) -> torch.Tensor:
    """Each row (index of the first dimension) rounded to the nearest multiple of its absmax / 127."""
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        step = w[i].abs().max().item() / 127
        out[i] = torch.round(w[i] / step) * step if step > 0 else 0
    return out


def test_int8_equals_a_brute_force_row_wise_absmax_quantizer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, 5, 5, generator=g) * torch.logspace(-3, 1, 64)[:, None, None, None]
    w[7] = 0  # a zero row keeps its zeros
    stored = encode({"w": w, "norm": torch.randn(16, generator=g), "step": torch.tensor(3)}, "int8")
    assert stored["w:int8"].dtype == torch.int8 and stored["w:int8"].shape == w.shape
    assert stored["w:int8"].abs().max() == 127 and stored["w:int8_scale"].shape == (64,)
    assert stored["norm"].dtype == torch.float16 and stored["step"].dtype == torch.int64  # small / non-float
    state = decode(stored)
    torch.testing.assert_close(state["w"], brute_force_int8(w), rtol=1e-6, atol=1e-9)
    assert (state["w"][7] == 0).all()
    # the error of each element is at most half a step of its row
    step = w.reshape(64, -1).abs().amax(1) / 127
    assert ((state["w"] - w).reshape(64, -1).abs() <= step[:, None] / 2 * (1 + 1e-5)).all()


def test_storing_loaded_int8_weights_again_gives_the_same_tensors():
    w = torch.randn(4096, 8, generator=torch.Generator().manual_seed(1)) * torch.rand(4096, 1)
    first = encode({"w": w}, "int8")
    again = encode(decode(first), "int8")
    assert torch.equal(again["w:int8"], first["w:int8"]) and torch.equal(again["w:int8_scale"], first["w:int8_scale"])


def test_vectors_and_small_tensors_are_not_int8_and_a_transposed_weight_is():
    w = torch.randn(64, INT8_MIN_ELEMENTS // 64)
    stored = encode({"small": torch.ones(2, INT8_MIN_ELEMENTS // 2 - 1), "vector": torch.ones(INT8_MIN_ELEMENTS),
                     "w": w.t()}, "int8")  # w.t() is not contiguous
    assert set(stored) == {"small", "vector", "w:int8", "w:int8_scale"}
    assert stored["small"].dtype == stored["vector"].dtype == torch.float16
    torch.testing.assert_close(decode(stored)["w"], brute_force_int8(w.t().contiguous()), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("storage", ["fp16", "int8"])
def test_values_fp16_cannot_hold_are_refused_naming_the_tensor(storage):
    with pytest.raises(ValueError, match=r"norm reaches 7e\+04, beyond fp16's 65504: store this model in fp32"):
        encode({"norm": torch.tensor([1.0, 7e4])}, storage)
    with pytest.raises(ValueError, match="w holds non-finite values"):
        encode({"w": torch.full((64, 64), float("nan"))}, storage)
    assert encode({"norm": torch.tensor([1.0, 7e4], dtype=torch.bfloat16)}, "fp32")["norm"].dtype == torch.float32


@pytest.mark.parametrize("storage, max_relative_error, max_bytes", [("fp16", 2e-3, 0.52), ("int8", 4e-2, 0.30)])
def test_a_generator_stored_smaller_loads_with_the_fingerprint_it_records(tmp_path, storage, max_relative_error,
                                                                          max_bytes):
    cfg = config("class", size="tiny", k=512, grid=(4, 4))
    model = random_model(cfg)
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / storage, storage)
    again = Generator.from_pretrained(tmp_path / storage)
    recorded = (tmp_path / storage / "fingerprint.txt").read_text().strip()
    assert again.fingerprint() == recorded != model.fingerprint()
    # the fingerprint is that of the fp32 weights it loads as, computed from the file's tensors
    assert recorded == model_fingerprint(again.config, decode(load_file(str(tmp_path / storage / "model.safetensors"))))
    size = (tmp_path / storage / "model.safetensors").stat().st_size
    assert size < max_bytes * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    codes, labels = torch.randint(0, 512, (4, 16)), condition_for(cfg, 4)
    with torch.no_grad():
        exact, stored = model.logits(codes, labels), again.logits(codes, labels)
    assert (stored - exact).norm() / exact.norm() < max_relative_error


def test_a_tokenizer_stored_in_int8_loads_with_its_fingerprint_and_decodes_close(tmp_path):
    torch.manual_seed(0)
    tokenizer = Tokenizer(TINY).eval()
    tokenizer.save_pretrained(tmp_path / "tok", "int8")
    again = Tokenizer.from_pretrained(tmp_path / "tok")
    assert again.fingerprint() == (tmp_path / "tok" / "fingerprint.txt").read_text().strip()
    stored = load_file(str(tmp_path / "tok" / "model.safetensors"))
    assert any(k.endswith(":int8") and stored[k].dim() == 4 for k in stored)  # conv weights too, per out-channel
    indices = torch.randint(0, 128, (2, 4, 4))
    with torch.no_grad():
        exact, close = tokenizer.decode(indices), again.decode(indices)
    assert (close - exact).norm() / exact.norm() < 3e-2


def test_int8_weights_without_their_scales_are_refused(tmp_path):
    model = random_model(config("class", size="tiny", k=256))
    model.save_pretrained(tmp_path / "g", "int8")
    path = tmp_path / "g" / "model.safetensors"
    stored = load_file(str(path))
    name = next(k for k in stored if k.endswith(":int8_scale"))
    del stored[name]
    save_file(stored, str(path))
    with pytest.raises(ArtifactError, match="have no .*int8_scale.*incomplete"):
        Generator.from_pretrained(tmp_path / "g")
    stored[name] = torch.ones(3)  # a scale of the wrong shape
    save_file(stored, str(path))
    with pytest.raises(ArtifactError, match=r"int8_scale' of shape \(\d+,\): the file is incomplete"):
        Generator.from_pretrained(tmp_path / "g")


def test_an_unknown_storage_is_refused():
    with pytest.raises(ValueError, match="unknown weight storage 'int4'.*fp32, fp16, int8"):
        encode({"w": torch.ones(2)}, "int4")
