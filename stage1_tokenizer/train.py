"""Stage-1 training: a SimVQ tokenizer with L1 + perceptual + GAN + quantizer losses.

One process, or many under torchrun (DDP: gloo on CPU, nccl on GPU). A run resumes exactly:
the checkpoint holds the step, both models and optimisers, the EMA weights, every RNG state
and the data position, so N steps + resume + N steps equals 2N straight steps.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from simvq_common.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from simvq_common.config import to_yaml
from simvq_common.console import console, progress
from simvq_common.ema import update_ema
from simvq_common import distributed
from simvq_common.distributed import barrier, rank, world_size
from simvq_common.errors import ArtifactError, ConfigError, NonFiniteLoss
from simvq_common.preemption import PreemptionWatch
from simvq_common.run_dir import RunDir
from simvq_common.run_lock import holding_run_dir
from simvq_common.tracking import TrackingSettings
from simvq_common.numerics import set_deterministic, use_bf16, use_compile

from .config import TokenizerTrainConfig
from image_data.datasets import build_image_dataset
from image_data.loading import collate_skip_none, epoch_sampler_for
from .losses import (PatchDiscriminator, adaptive_generator_weight, check_generator_loss_kind, gan_weight_at,
                     generator_adversarial_loss, hinge_d_loss)
from .perceptual import build_perceptual_loss
from .quantizers import CodebookUsage
from .tokenizer import Tokenizer
from image_data.visualize import save_image_grid


def autocast_context(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(precision, device) else nullcontext()


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """run.channels_last: true / false, or null = auto: CHANNELS_LAST_AUTO (docs/BENCHMARKS.md)."""
    return device.type in CHANNELS_LAST_AUTO if setting is None else bool(setting)


def check_resumable(saved: dict, cfg: TokenizerTrainConfig) -> None:
    """A checkpoint may only continue the run it belongs to: same model, data and world size."""
    now = {"tokenizer": asdict(cfg.tokenizer), "data": asdict(cfg.data), "world_size": world_size()}
    for key, value in now.items():
        if saved["identity"][key] != value:
            raise ConfigError(f"cannot resume: the checkpoint's {key} is {saved['identity'][key]}, this run's is "
                              f"{value}; use a new run.out_dir or the original config")


# where run.channels_last=null turns NHWC on: CUDA, where cuDNN's tensor-core convs are NHWC kernels (NCHW
# activations are transposed around each; not measured here yet: `benchmarks/bench_tokenizer_train.py` on a GPU
# should confirm or flip it). Not the CPU: a step of the CPU demo's config ran 1.03-1.09x faster in NHWC on a
# loaded 2-core machine (docs/BENCHMARKS.md), but NHWC rounds differently, and the CPU results in
# docs/RESULTS.md are reproduced bit for bit by their commands; `run.channels_last=true` takes the gain.
CHANNELS_LAST_AUTO = ("cuda",)


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerTrainConfig):
        self.cfg = cfg
        check_generator_loss_kind(cfg.loss.gan_kind)  # now, not at gan_start_step hours into the run
        self.device = distributed.setup()
        set_deterministic(cfg.run.deterministic)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        # models
        self.tokenizer = Tokenizer(cfg.tokenizer).to(self.device)
        self.ema = copy.deepcopy(self.tokenizer).requires_grad_(False).eval()
        self.discriminator = PatchDiscriminator(cfg.tokenizer.autoencoder.in_channels, cfg.loss.disc_ndf,
                                                cfg.loss.disc_layers).to(self.device)
        self.perceptual = build_perceptual_loss(cfg.loss.perceptual, cfg.loss.perceptual_weights)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self._set_speed_options()
        # what the training step calls: the models themselves, or their DDP wrappers under several processes
        self.tokenizer_ddp, self.discriminator_ddp = self.tokenizer, self.discriminator
        if world_size() > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            # no buffer broadcast: the frozen codebook is built from its seed on every rank and EMA codebooks
            # all-reduce their own updates, so re-sending them each step (128 MiB at K = 262,144) buys nothing
            self.tokenizer_ddp = DDP(self.tokenizer, device_ids=device_ids, broadcast_buffers=False)
            # D sees reals, then fakes, before one backward: broadcasting its BatchNorm buffers between
            # the two calls breaks autograd, and D never runs in eval mode, so they need not be in sync
            self.discriminator_ddp = DDP(self.discriminator, device_ids=device_ids, broadcast_buffers=False)
        # optimisers
        betas = tuple(cfg.optim.betas)
        self.opt_g = torch.optim.Adam(self.tokenizer.parameters(), lr=cfg.optim.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.optim.lr, betas=betas)
        # data
        self.dataset = build_image_dataset(cfg.data.source, "train", cfg.data.resolution, cfg.run.seed,
                                           share=distributed.work_share())
        self.sampler = epoch_sampler_for(self.dataset, seed=cfg.run.seed, rank=rank(), world_size=world_size())
        self.val_images = self._fixed_val_batch()
        # state that the checkpoint carries
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped_images = 0  # unreadable images met by this rank (since the resume, on ranks > 0)
        self.dropped_batches = 0  # batches no rank trained on, because one rank's were all unreadable
        self.run_dir = (RunDir(cfg.run.out_dir, cfg, resume=True, kind="tokenizer-run",
                               tracking=TrackingSettings.of(cfg.run)) if rank() == 0 else None)
        self.checkpoints = Path(cfg.run.out_dir) / "checkpoints"
        self._resume()

    def _set_speed_options(self) -> None:
        """run.channels_last: NHWC weights (the input batches follow in train_step); run.compile: torch.compile
        of the conv nets in place (encoder, decoder, perceptual net, discriminator), so that the modules, their
        state dicts and the checkpoints keep their own keys (no `_orig_mod.`). The quantizer stays eager: its
        blocked nearest-code search asks the host which rows improved, a graph break per code block."""
        run = self.cfg.run
        self.channels_last = use_channels_last(run.channels_last, self.device)
        self.compiled = use_compile(run.compile, self.device)
        if self.channels_last:  # the EMA copy stays NCHW: it only runs for the image grids and the export
            for net in (self.tokenizer, self.discriminator, self.perceptual):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        if not self.compiled:
            return
        nets = [self.tokenizer.encoder, self.tokenizer.decoder]
        if self.perceptual is not None:
            nets.append(self.perceptual)
        if self.cfg.loss.gan_adaptive:
            # the adaptive weight backpropagates through the decoder's and D's graphs (retain_graph=True) before
            # the real backward. AOTAutograd's donated buffers allow one backward only, and a compiled D
            # (training-mode BatchNorm, then in-place LeakyReLU) returns a wrong input gradient from its second
            # backward on (torch 2.14, CPU; tests/test_tokenizer_speed_options.py): D stays eager then
            torch._functorch.config.donated_buffer = False
        else:
            nets.append(self.discriminator)
        for net in nets:
            net.compile()

    def _fixed_val_batch(self, n: int = 16) -> torch.Tensor:
        val = build_image_dataset(self.cfg.data.source, "val", self.cfg.data.resolution, self.cfg.run.seed,
                                  share=distributed.work_share())
        images = []  # the first n readable validation images: the same grid at every step
        for i in range(len(val)):
            if len(images) == n:
                break
            item = val[i]
            if item is not None:
                images.append(item[0])
        if not images:
            raise ArtifactError(f"no readable validation image in {self.cfg.data.source}: its val split needs some")
        return torch.stack(images).to(self.device)

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self, skipped_images: int) -> dict:
        return {
            "identity": {"tokenizer": asdict(self.cfg.tokenizer), "data": asdict(self.cfg.data),
                         "world_size": world_size()},
            "config_yaml": to_yaml(self.cfg),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "skipped_images": skipped_images, "dropped_batches": self.dropped_batches,
            "tokenizer": self.tokenizer.state_dict(), "ema": self.ema.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "rng": rng_state(),
        }

    def _resume(self) -> None:
        saved = load_latest_checkpoint(self.checkpoints)
        if saved is None:
            return
        check_resumable(saved, self.cfg)
        self.tokenizer.load_state_dict(saved["tokenizer"])
        self.ema.load_state_dict(saved["ema"])
        self.discriminator.load_state_dict(saved["discriminator"])
        self.opt_g.load_state_dict(saved["opt_g"])
        self.opt_d.load_state_dict(saved["opt_d"])
        self.step, self.epoch, self.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        # the saved count is the sum over ranks: rank 0 carries it on
        self.skipped_images = saved["skipped_images"] if rank() == 0 else 0
        self.dropped_batches = saved.get("dropped_batches", 0)
        set_rng_state(saved["rng"])
        if rank() == 0:
            console.print(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def save(self) -> None:
        skipped = int(distributed.sum_over_ranks(self.skipped_images))  # every rank takes part
        # rank 0 writes; its error (a full disk) reaches every rank instead of leaving them in a barrier
        distributed.rank0_decides(lambda: save_checkpoint(self.checkpoints, self.step, self._state(skipped),
                                                          self.cfg.run.keep_checkpoints))

    # -- data ------------------------------------------------------------------------------------
    def batches(self):
        """Endless (images, labels), resuming mid-epoch at the saved position."""
        while True:
            self.sampler.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch)
            self.sampler.start_index = self.batch_in_epoch * self.cfg.data.batch_size
            loader = DataLoader(self.dataset, batch_size=self.cfg.data.batch_size, sampler=self.sampler,
                                num_workers=self.cfg.data.num_workers, collate_fn=collate_skip_none, drop_last=True)
            for images, labels, skipped in loader:
                self.batch_in_epoch += 1
                self.skipped_images += skipped
                # a batch of only unreadable files is dropped on every rank together: a rank that skipped a
                # step alone would leave DDP's collectives and the data positions out of step
                if distributed.any_rank(len(images) == 0):
                    self.dropped_batches += 1
                    continue
                yield images.to(self.device, non_blocking=True), labels
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # -- one step --------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        warmup = self.cfg.optim.warmup_steps
        lr = self.cfg.optim.lr * min(1.0, (self.step + 1) / warmup) if warmup else self.cfg.optim.lr
        for group in (*self.opt_g.param_groups, *self.opt_d.param_groups):
            group["lr"] = lr
        return lr

    def train_step(self, x: torch.Tensor) -> dict:
        cfg, loss_cfg = self.cfg, self.cfg.loss
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = self._set_lr()
        gan_weight = gan_weight_at(self.step, loss_cfg.gan_start_step, loss_cfg.gan_weight)
        autocast = autocast_context(self.device, cfg.run.precision)
        # generator: reconstruction + perceptual + quantizer (+ adversarial once the GAN is on)
        self.discriminator.requires_grad_(False)
        with autocast:
            reconstruction, q = self.tokenizer_ddp(x)
            l1 = F.l1_loss(reconstruction.float(), x)
            perceptual = (self.perceptual(reconstruction.float(), x).mean() if self.perceptual is not None
                          else torch.zeros((), device=x.device))
            rec_loss = loss_cfg.l1_weight * l1 + loss_cfg.perceptual_weight * perceptual
            g_adv = torch.zeros((), device=x.device)
            adv_weight = torch.zeros((), device=x.device)
            if gan_weight > 0:
                # the unwrapped discriminator: it is not updated here, so DDP need not sync it
                g_adv = generator_adversarial_loss(self.discriminator(reconstruction), loss_cfg.gan_kind)
                adv_weight = torch.tensor(gan_weight, device=x.device)
                if loss_cfg.gan_adaptive:
                    adv_weight = adv_weight * adaptive_generator_weight(
                        rec_loss, g_adv, self.tokenizer.decoder.conv_out.weight)
            loss_g = rec_loss + adv_weight * g_adv + loss_cfg.quantizer_weight * q.loss
        # the step's one host sync, decided by all ranks together: one rank stopping alone would hang the others
        if distributed.any_rank(not bool(torch.isfinite(loss_g))):
            raise NonFiniteLoss(f"non-finite generator loss at step {self.step} (this rank: l1 {l1.item()}, perceptual "
                                f"{perceptual.item()}, quantizer {q.loss.item()}, gan {g_adv.item()}); training "
                                f"stopped, the last good checkpoint is in {self.checkpoints}. Lower optim.lr, set "
                                f"optim.grad_clip, or raise loss.gan_start_step")
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        g_norm = self._clip(self.tokenizer, measure=True)
        self.opt_g.step()
        # discriminator: hinge loss on real vs the (detached) reconstructions
        d_loss = torch.zeros((), device=x.device)
        if gan_weight > 0:
            self.discriminator.requires_grad_(True)
            with autocast:
                d_loss = hinge_d_loss(self.discriminator_ddp(x), self.discriminator_ddp(reconstruction.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self._clip(self.discriminator)
            self.opt_d.step()
        # EMA of the tokenizer weights
        update_ema(self.ema, self.tokenizer, cfg.optim.ema_decay)
        self.step += 1
        # device tensors: read back on log steps only, so the next step can be queued while this one runs
        return {"loss": loss_g.detach(), "l1": l1.detach(), "perceptual": perceptual.detach(),
                "quantizer_loss": q.loss.detach(), "g_adv": g_adv.detach(), "d_loss": d_loss.detach(),
                "gan_weight": adv_weight.detach(), "lr": lr, "grad_norm": g_norm, "indices": q.indices}

    def _clip(self, module: torch.nn.Module, measure: bool = False) -> torch.Tensor | float:
        """Clips the gradients to optim.grad_clip (when set); returns their global norm before clipping, or nan
        when neither clipped nor asked to `measure` (the tokenizer's is logged as grad_norm)."""
        if self.cfg.optim.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.grad_clip)
        if measure:
            return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])
        return float("nan")

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to run.steps and export; TensorBoard / W&B are closed at the end, or when training stops."""
        with self.run_dir if self.run_dir is not None else nullcontext():
            return self._train()

    def _train(self) -> Path:
        run = self.cfg.run
        usage = CodebookUsage(self.tokenizer.codebook_size, self.device)
        tic, images_seen = time.perf_counter(), 0
        with progress() as bar, PreemptionWatch(run.preemption_signals) as preemption:
            task = bar.add_task("tokenizer", total=run.steps, completed=self.step, status="")
            batches = self.batches()
            while self.step < run.steps:
                x, _ = next(batches)
                stats = self.train_step(x)
                usage.update(stats.pop("indices"))
                images_seen += x.shape[0] * world_size()
                record = {}  # one metrics.jsonl line per step: the training window's stats, val_l1 on image steps
                if self.step % run.log_every == 0 or self.step == run.steps:
                    stats = {k: float(v) for k, v in stats.items()}
                    window = usage.merged().summary()
                    bad = int(distributed.sum_over_ranks(self.skipped_images))
                    record.update(epoch=self.epoch, **stats, utilisation=window["utilisation"],
                                  perplexity=window["perplexity"],
                                  images_per_s=images_seen / (time.perf_counter() - tic),
                                  global_batch=self.cfg.data.batch_size * world_size(), skipped_images=bad,
                                  dropped_batches=self.dropped_batches)
                    bar.update(task, status=f"loss {stats['loss']:.3f} util {window['utilisation']:.1%}")
                    usage = CodebookUsage(self.tokenizer.codebook_size, self.device)
                if self.step % run.image_every == 0 or self.step == run.steps:
                    record.update(self.save_reconstructions())
                if record and rank() == 0:
                    self.run_dir.log(step=self.step, **record)
                # every rank, every step: a signal to one stops all here
                preemption.checkpoint_phase(self.save, self.step % run.checkpoint_every == 0 or
                                            self.step == run.steps, run.out_dir, self.step)
                bar.update(task, completed=self.step)
        out = Path(run.out_dir) / "tokenizer"
        if rank() == 0:
            self.ema.cpu().save_pretrained(out)
            self.ema.to(self.device)
        barrier()
        return out

    @torch.no_grad()
    def save_reconstructions(self) -> dict:
        """The EMA tokenizer on the fixed val batch: the grid (images over their reconstructions) as a PNG and
        to TensorBoard / W&B, and its L1 to log as val_l1. Rank 0; {} on the others."""
        if rank() != 0:
            return {}
        reconstruction, _ = self.ema(self.val_images)
        grid = save_image_grid(torch.cat([self.val_images, reconstruction.clamp(-1, 1)]),
                               self.run_dir.path(f"reconstructions/step_{self.step:08d}.png"), rows=2)
        self.run_dir.image("reconstructions", grid, self.step)
        return {"val_l1": float(F.l1_loss(reconstruction.float(), self.val_images))}


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train (or resume) the run in cfg.run.out_dir, which it holds alone; returns the exported tokenizer
    directory (EMA weights)."""
    distributed.setup()
    with holding_run_dir(cfg.run.out_dir, "train-tokenizer"):
        return TokenizerTrainer(cfg).train()
