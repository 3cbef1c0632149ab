"""Config schemas of the studies (typed dataclasses; loaded with simvq_common.config.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from stage1_tokenizer.config import AutoencoderConfig, QuantizerConfig


def _small_autoencoder() -> AutoencoderConfig:
    return AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, norm_groups=8)


@dataclass
class CollapseStudyConfig:
    out_dir: str = "runs/collapse_study"
    methods: list[str] = field(default_factory=lambda: ["vq", "ema_vq", "simvq"])
    codebook_sizes: list[int] = field(default_factory=lambda: [1024, 8192, 65536])
    resolution: int = 32
    autoencoder: AutoencoderConfig = field(default_factory=_small_autoencoder)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # kind and size set per run
    steps: int = 400  # the most steps a run trains
    eval_every: int = 0  # measure train-split utilisation every N steps (the curves; 0 = only at the end)
    plateau_window: int = 0  # stop once train utilisation moved < plateau_tolerance over N steps (0 = never)
    plateau_tolerance: float = 0.01
    min_steps: int = 0  # ... but not before this step
    curve_images: int = 0  # the curves' train images: the first N (0 = the whole train split)
    basis_lr_scale: float = 1.0  # SimVQ: the linear layer's learning rate relative to lr
    batch_size: int = 32
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    eval_batch_size: int = 256
    log_every: int = 25
    seed: int = 0
    results_md: str = ""  # a markdown file whose collapse-study section is rewritten ("" = none)
    figure: str = ""  # a PNG of the curves (needs eval_every)
    command: str = ""  # the command line, recorded with the results


@dataclass
class TokenizerComparisonConfig:
    base_config: str = "configs/tokenizer/emoji32_simvq_8k_cpu.yaml"
    overrides: list[str] = field(default_factory=list)  # applied to the base config of every run
    kinds: list[str] = field(default_factory=lambda: ["vq", "simvq"])
    codebook_sizes: list[int] = field(default_factory=lambda: [1024, 8192, 65536])
    out_dir: str = "runs/tokenizer_comparison"
    eval_perceptual: str = "auto"
    eval_fid_source: str = "auto"
    results_md: str = ""
    command: str = ""

