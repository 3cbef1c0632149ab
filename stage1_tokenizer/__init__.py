"""Stage 1: the SimVQ image tokenizer (quantizers, autoencoder, training, evaluation)."""
from .config import TokenizerConfig, TokenizerTrainConfig
from .quantizers import EMAVQ, VQ, CodebookUsage, SimVQ, nearest_code
from .tokenizer import Tokenizer

__all__ = ["CodebookUsage", "EMAVQ", "SimVQ", "Tokenizer", "TokenizerConfig", "TokenizerTrainConfig", "VQ",
           "nearest_code"]
