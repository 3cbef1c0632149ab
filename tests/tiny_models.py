"""The tiny SimVQ tokenizer the stage tests share: 2x downsampling, K = 64, random weights from `seed`."""
import torch

from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from stage1_tokenizer.tokenizer import Tokenizer

TINY_K = 64


def tiny_tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer(TokenizerConfig(AutoencoderConfig(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                                                       norm_groups=4),
                                     QuantizerConfig(kind="simvq", codebook_size=TINY_K))).eval()
