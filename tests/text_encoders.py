"""A small token-feature text encoder made here (offline): a 1-layer T5 encoder with ByT5's byte tokenizer,
which needs no vocabulary file. It stands in for google/flan-t5-xl in the token-feature tests."""
from pathlib import Path

import torch

TINY_T5_WIDTH = 16


def tiny_t5_dir(path: Path, seed: int = 0) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    config = T5Config(vocab_size=384, d_model=TINY_T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      is_encoder_decoder=True)
    T5EncoderModel(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return Path(path)
