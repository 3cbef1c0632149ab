import pytest
import torch

from stage1_tokenizer.autoencoder import VQAutoencoder
from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig
from stage1_tokenizer.quantizers import QUANTIZERS

TINY = AutoencoderConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4)


@pytest.mark.parametrize("kind", sorted(QUANTIZERS))
def test_decode_of_encode_equals_forward_reconstruction(kind):
    torch.manual_seed(0)
    model = VQAutoencoder(TINY, QuantizerConfig(kind=kind, codebook_size=64)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, q = model(x)
    assert q.indices.shape == (2, 8, 8)
    indices = model.encode(x)
    assert torch.equal(indices, q.indices)
    # forward decodes z + (z_q - z), which rounds differently from z_q by an ulp of |z|
    torch.testing.assert_close(model.decode(indices), reconstruction, rtol=1e-4, atol=1e-5)


def test_paper_model_shape_and_size():
    model = VQAutoencoder(AutoencoderConfig(), QuantizerConfig(codebook_size=1024))
    assert model.downsample_factor == 8
    z = model.encoder(torch.zeros(1, 3, 128, 128))
    assert z.shape == (1, 128, 16, 16)  # 128^2 -> 16x16 tokens of dim 128
    assert model.decoder(z).shape == (1, 3, 128, 128)
    # no attention and no quant_conv: only convs, norms and the quantizer's linear basis
    kinds = {type(m).__name__ for m in model.modules()}
    assert not kinds & {"MultiheadAttention", "Linear"} - {"Linear"}
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 1


def test_bad_group_count_is_clear():
    with pytest.raises(ValueError, match="divisible by groups"):
        VQAutoencoder(AutoencoderConfig(ch=12, norm_groups=8), QuantizerConfig(codebook_size=16))


def test_unknown_quantizer_kind_is_clear():
    with pytest.raises(ValueError, match="unknown quantizer kind 'lfq'"):
        VQAutoencoder(TINY, QuantizerConfig(kind="lfq", codebook_size=16))
