"""Config schemas of stage 1 (typed dataclasses; loaded with simvq_common.config.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AutoencoderConfig:
    """VQGAN-style conv autoencoder. Defaults = the SimVQ paper's ImageNet 128x128 model."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 128  # = the code dimension: there is no quant_conv
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class QuantizerConfig:
    kind: str = "simvq"  # simvq | vq | ema_vq
    codebook_size: int = 65536
    beta: float = 0.25  # scales the commitment (encoder-side) term
    bias: bool = True  # SimVQ: bias of the linear basis
    seed: int = 0  # the frozen codebook (SimVQ) / the initial codebook (EMA VQ)
    ema_decay: float = 0.99  # EMA VQ only
    search_max_mb: float = 8.0  # memory budget of the nearest-code distance blocks
