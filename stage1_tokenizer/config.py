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
    """Every kind's fields in one flat section: each kind reads its own in its `from_config`
    (stage1_tokenizer/quantizers/). Kept flat because a tokenizer's fingerprint hashes this section as saved:
    sections per kind would change the fingerprint of every saved tokenizer and orphan its caches."""

    kind: str = "simvq"  # a key of stage1_tokenizer.quantizers.QUANTIZERS: simvq | vq | ema_vq
    codebook_size: int = 65536
    beta: float = 0.25  # scales the commitment (encoder-side) term
    bias: bool = True  # SimVQ: bias of the linear basis
    seed: int = 0  # the frozen codebook (SimVQ) / the initial codebook (EMA VQ)
    ema_decay: float = 0.99  # EMA VQ only
    search_max_mb: float = 8.0  # memory budget of the nearest-code distance blocks


@dataclass
class TokenizerConfig:
    """Everything needed to rebuild a tokenizer: saved as config.yaml beside its weights."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    perceptual: str = "lpips-vgg"  # lpips-vgg | stlpips-vgg (offline weights) | none
    perceptual_weights: str = ""  # local VGG16 weights for lpips-vgg when offline
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1  # the paper's fixed generator weight
    gan_adaptive: bool = False  # VQGAN's adaptive weight (grad-norm ratio) times gan_weight
    # generator side: non_saturating_image_mean (the paper's code) | non_saturating_per_patch | hinge;
    # the default keeps the CPU demo's numbers (docs/DISCRIMINATOR.md)
    gan_kind: str = "non_saturating_per_patch"
    gan_start_step: int = 0  # the paper trains the GAN from step 0; later starts are often steadier
    disc_ndf: int = 64
    disc_layers: int = 3
    quantizer_weight: float = 1.0


@dataclass
class DataConfig:
    source: str = "emoji"  # "emoji" (bundled) or an image folder (ImageNet layout: train/, val/)
    resolution: int = 128
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0  # linear warm-up of both learning rates
    grad_clip: float = 0.0  # max grad norm; 0 = off
    ema_decay: float = 0.999  # EMA of the tokenizer weights, used for evaluation and export


@dataclass
class RunConfig:
    out_dir: str = "runs/tokenizer"
    steps: int = 1000
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    deterministic: bool = False  # deterministic CUDA kernels: bitwise resume on GPU, at some speed (docs/RECIPE.md)
    compile: bool | None = None  # torch.compile of the conv nets; null = auto: on on CUDA, off on CPU; true / false
    channels_last: bool | None = None  # NHWC conv nets and batches; null = auto: on on CUDA, off on CPU; true / false
    log_every: int = 10
    image_every: int = 500  # reconstruction grid PNG
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # signals that end the run at the next step boundary, checkpointed (a scheduler's preemption; [] = none)
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    tensorboard: bool = True  # metrics and grids also as TensorBoard events in out_dir/tensorboard/
    wandb: str = ""  # a Weights & Biases project to log to as well ("" = none); files in out_dir/wandb/
    wandb_mode: str = "auto"  # online | offline | auto (WANDB_MODE, else offline under HF_HUB_OFFLINE=1, else online)


@dataclass
class TokenizerTrainConfig:
    """One file describes a whole stage-1 experiment (configs/tokenizer/*.yaml)."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class TokenizerEvalConfig:
    tokenizer: str = ""  # a tokenizer directory (save_pretrained / train-tokenizer output)
    data: str = "emoji"  # "emoji" or an image folder (ImageNet layout)
    split: str = "val"
    resolution: int = 0  # the evaluation resolution (required: e.g. 128 for the paper's configs)
    batch_size: int = 64
    max_images: int = 0  # 0 = the whole split
    perceptual: str = "auto"  # auto (lpips-vgg if its weights load, else stlpips-vgg) | lpips-vgg | stlpips-vgg | none
    fid_source: str = "auto"  # auto | torch-fidelity | offline-torchscript
    device: str = "auto"  # auto = this process's GPU if there is one, else cpu
    out: str = ""  # eval.json path; default <tokenizer>/eval.json
