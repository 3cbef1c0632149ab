"""Vector quantizers behind one interface: forward(z) -> QuantizerOutput, indices_to_codes(indices)."""
from .base import Quantizer, QuantizerOutput
from .ema_vq import EMAVQ
from .health import CodebookUsage
from .search import nearest_code
from .simvq import SimVQ
from .vq import VQ

QUANTIZERS = {"simvq": SimVQ, "vq": VQ, "ema_vq": EMAVQ}

__all__ = ["QUANTIZERS", "CodebookUsage", "EMAVQ", "Quantizer", "QuantizerOutput", "SimVQ", "VQ", "nearest_code"]
