"""Vector quantizers behind one interface: forward(z) -> QuantizerOutput, indices_to_codes(indices)."""
from .base import Quantizer, QuantizerOutput
from .ema_vq import EMAVQ
from .health import CodebookUsage
from .search import nearest_code
from .simvq import SimVQ
from .vq import VQ

# The registry: tokenizer.quantizer.kind -> its class (built by its from_config). Only this package names a kind.
QUANTIZERS: dict[str, type[Quantizer]] = {"simvq": SimVQ, "vq": VQ, "ema_vq": EMAVQ}


def display_name(kind: str) -> str:
    """How tables name a quantizer kind ("SimVQ", "plain VQ"); an unregistered name as it is."""
    return QUANTIZERS[kind].display_name if kind in QUANTIZERS else kind

__all__ = ["QUANTIZERS", "display_name", "CodebookUsage", "EMAVQ", "Quantizer", "QuantizerOutput", "SimVQ", "VQ", "nearest_code"]
