"""One stage-1 training step: torch.compile and channels_last, each on and off (images/s, peak memory, MFU).

    python benchmarks/bench_tokenizer_train.py [--config configs/tokenizer/emoji32_simvq_8k_cpu.yaml] [--batch 16]
                                               [--steps 4] [--warmup 3] [--repeats 2] [--threads 1] [--no-gan]
                                               [--quick]

The paper's K = 65,536 model at 128 px: `--config configs/tokenizer/imagenet128_simvq_65k.yaml --batch 2` (about
15 s per step on 2 CPU cores, and minutes of compilation: too slow for the default CPU run, meant for a GPU).

A step is `stage1_tokenizer.train.TokenizerTrainer.train_step` itself: the autoencoder's forward, its real losses
(L1 + perceptual + quantizer + the generator's adversarial loss), backward and Adam step, then the
discriminator's hinge-loss forward, backward and Adam step, then the EMA update. The GAN is on from step 0, as
in the paper (`loss.gan_start_step=0`); `--no-gan` leaves it out (`loss.gan_weight=0`: autoencoder only). The
config's perceptual backend is used when its weights are here; lpips-vgg without its VGG16 weights (they would
have to be downloaded) becomes stlpips-vgg, the same VGG16 trunk. Data: one batch of the config's data at its
resolution (the bundled emoji; above their 64 px, the emoji upscaled into a temporary image folder), reused
for every step, so data loading is not timed.

Four variants, `run.compile` x `run.channels_last` (false / true each), every one in a fresh process,
alternating, `--repeats` rounds; each keeps its fastest repeat (`--steps` timed steps after `--warmup`
untimed ones, where compilation happens). One torch thread per process by default (`--threads`): on these shared
2-core machines another job holds a core, and a second thread then waits on it in every parallel region
(bench_generator_train.py saw the same). Precision: `run.precision=auto` (fp32 on the CPU, bf16 autocast
on CUDA). Peak memory: on CUDA max_memory_allocated over the timed steps; on the CPU the RSS high-water mark
during the timed steps above the RSS before them (weights and optimizer state exist by then). Model FLOPs of a
step: torch.utils.flop_counter.FlopCounterMode over one whole eager step (every conv and matrix product of the
forwards and backwards, multiply-add = 2; a conv's backward is its input gradient plus its weight gradient,
2x its forward, less where no gradient is needed: the frozen perceptual net's weights, the first conv's input). MFU = those FLOPs x steps/s / the
machine's GEMM rate measured in the same run (fp32 torch.mm 2048^3 on the CPU, bf16 8192^3 on CUDA), before
and after the runs: the higher of the two. Writes benchmarks/results/tokenizer_train.json and the
tokenizer_train section of docs/BENCHMARKS.md; `--quick` (configs/tokenizer/gpu_check_tiny.yaml, batch 8,
1 repeat, 2 timed steps after 3) prints only and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (
    MIB,
    REPO,
    cpu_times,
    machine_rate,
    markdown_table,
    other_cpu_share,
    parse_quick_args,
    provenance,
    publish,
    run_json_worker,
    timed_steps,
)
from simvq_common.config import load_config
from stage1_tokenizer.config import TokenizerTrainConfig
from image_data.emoji import EMOJI_NATIVE_RESOLUTION, load_emoji

DEFAULT_CONFIG = "configs/tokenizer/emoji32_simvq_8k_cpu.yaml"
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (compile, channels_last)
QUICK = {"config": "configs/tokenizer/gpu_check_tiny.yaml", "batch": 8, "steps": 2, "warmup": 3, "repeats": 1}


def variant_name(compile_: bool, channels_last: bool) -> str:
    return f"{'compile' if compile_ else 'eager'}, {'channels_last' if channels_last else 'NCHW'}"


# ----------------------------------------------------------------------------------------- worker

def worker(args) -> dict:
    """Train warm-up + timed steps of one variant in this process; returns one JSON record."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from stage1_tokenizer.train import TokenizerTrainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(TokenizerTrainConfig, args.config, [*json.loads(args.overrides), f"run.out_dir={out}",
                                                              f"run.compile={args.compile}",
                                                              f"run.channels_last={args.channels_last}"])
        trainer = TokenizerTrainer(cfg)
        device = trainer.device
        x = next(trainer.batches())[0]
        flops = None

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def step() -> float:
            return trainer.train_step(x)["loss"]

        losses, tic = [], time.perf_counter()
        for i in range(args.warmup):
            if i == 0 and not args.compile:  # FLOPs of one whole step, eager (the compiled step does the same)
                with FlopCounterMode(display=False) as counter:
                    losses.append(step())
                flops = counter.get_total_flops()
            else:
                losses.append(step())
        sync()
        warmup_s = time.perf_counter() - tic
        timed, times, peak = timed_steps(step, args.steps, device)
        losses += timed
        record = {"compile": args.compile, "channels_last": args.channels_last,
                  "used": {"compile": trainer.compiled, "channels_last": trainer.channels_last},
                  "device": str(device), "batch": x.shape[0], "resolution": x.shape[-1],
                  "step_times_s": times, "images_per_s": x.shape[0] * len(times) / sum(times),
                  "peak_bytes": int(peak), "losses": [float(v) for v in losses], "warmup_s": warmup_s,
                  "parameters": {"tokenizer": sum(p.numel() for p in trainer.tokenizer.parameters()),
                                 "discriminator": sum(p.numel() for p in trainer.discriminator.parameters())}}
        if flops is not None:
            record["flops_per_step"] = flops
        return record


# ------------------------------------------------------------------------------------- driver side

def run_worker(args, overrides: list[str], compile_: bool, channels_last: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config,
               "--overrides", json.dumps(overrides), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--threads", str(args.threads)]
    command += ["--compile"] if compile_ else []
    command += ["--channels-last"] if channels_last else []
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    return run_json_worker(command, variant_name(compile_, channels_last), cwd=REPO, env=env)


def perceptual_backend(cfg: TokenizerTrainConfig) -> tuple[str, str]:
    """(backend to use, why): the config's when its weights are here, else stlpips-vgg (downloads nothing)."""
    from stage1_tokenizer.perceptual import (
        PerceptualBackendUnavailable,
        build_perceptual_loss,
    )

    backend = cfg.loss.perceptual
    if backend != "lpips-vgg":
        return backend, "the config's"
    try:
        build_perceptual_loss(backend, cfg.loss.perceptual_weights, allow_download=False)
        return backend, "the config's"
    except PerceptualBackendUnavailable:
        return "stlpips-vgg", "lpips-vgg's VGG16 weights are not on this machine (no download): stlpips-vgg instead"


def upscaled_emoji_folder(root: Path, resolution: int, images: int = 64) -> Path:
    """An image folder (train/ and val/) of the bundled emoji upscaled to `resolution`: data above their 64 px."""
    from PIL import Image

    for split in ("train", "val"):
        image_set = load_emoji(split, EMOJI_NATIVE_RESOLUTION)
        (root / split / "emoji").mkdir(parents=True)
        for i in range(min(images, len(image_set))):
            Image.fromarray(image_set.images[i].permute(1, 2, 0).numpy()).resize(
                (resolution, resolution), Image.BICUBIC).save(root / split / "emoji" / f"{i:04d}.png")
    return root


def compare(args, data_dir: Path, console: Console | None = None) -> dict:
    cfg = load_config(TokenizerTrainConfig, args.config)
    resolution = cfg.data.resolution
    batch = args.batch or cfg.data.batch_size
    perceptual, why = perceptual_backend(cfg)
    source = "emoji" if resolution <= EMOJI_NATIVE_RESOLUTION else str(upscaled_emoji_folder(data_dir, resolution))
    overrides = [f"data.source={source}", f"data.batch_size={batch}", "data.num_workers=0", "run.precision=auto",
                 f"loss.perceptual={perceptual}", "run.log_every=1000000", "run.image_every=1000000",
                 "run.checkpoint_every=1000000"]
    overrides += ["loss.gan_weight=0"] if args.no_gan else ["loss.gan_start_step=0"]
    rates = [machine_rate(args.device)]
    records = []
    for repeat in range(args.repeats):
        for compile_, channels_last in VARIANTS:
            records.append({**run_worker(args, overrides, compile_, channels_last), "repeat": repeat})
            if console:
                r = records[-1]
                console.log(f"{variant_name(compile_, channels_last)} #{repeat}: {r['images_per_s']:.2f} images/s, "
                            f"peak {r['peak_bytes'] / MIB:,.0f} MiB, warm-up {r['warmup_s']:.0f} s")
    rates.append(machine_rate(args.device))
    peak_rate = max(r["flops"] for r in rates)
    counted = next(r for r in records if "flops_per_step" in r)
    flops = counted["flops_per_step"]
    reference_losses = counted["losses"]
    summary = []
    for compile_, channels_last in VARIANTS:
        rs = [r for r in records if (r["compile"], r["channels_last"]) == (compile_, channels_last)]
        best = max(rs, key=lambda r: r["images_per_s"])  # the least disturbed repeat
        steps_per_s = best["images_per_s"] / best["batch"]
        summary.append({"compile": compile_, "channels_last": channels_last, "images_per_s": best["images_per_s"],
                        "images_per_s_all": [r["images_per_s"] for r in rs],
                        "step_s": statistics.median(best["step_times_s"]), "mfu": flops * steps_per_s / peak_rate,
                        "peak_bytes": max(r["peak_bytes"] for r in rs), "warmup_s": min(r["warmup_s"] for r in rs),
                        "first_loss_difference": max(abs(r["losses"][0] - reference_losses[0]) for r in rs),
                        "max_loss_difference": max(abs(a - b) for r in rs
                                                   for a, b in zip(r["losses"], reference_losses))})
    base = summary[0]["images_per_s"]
    for s in summary:
        s["speed_vs_eager_nchw"] = s["images_per_s"] / base
    return {"records": records, "summary": summary, "gemm_rates": rates, "peak_rate": peak_rate,
            "flops_per_step": flops, "parameters": counted["parameters"],
            "device": counted["device"], "batch": batch, "resolution": resolution, "perceptual": perceptual,
            "perceptual_why": why, "overrides": overrides}


def table(summary: list[dict]) -> str:
    header = ["run.compile", "run.channels_last", "images/s", "vs eager NCHW", "s / step", "MFU", "peak MiB",
              "warm-up s", "loss diff step 1", "max loss diff"]
    rows = [["true" if s["compile"] else "false", "true" if s["channels_last"] else "false",
             f"{s['images_per_s']:.2f}", f"{s['speed_vs_eager_nchw']:.2f}x", f"{s['step_s']:.3f}", f"{s['mfu']:.1%}",
             f"{s['peak_bytes'] / MIB:,.0f}", f"{s['warmup_s']:.0f}", f"{s['first_loss_difference']:.1e}",
             f"{s['max_loss_difference']:.1e}"]
            for s in summary]
    return markdown_table(header, rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a stage-1 training config (configs/tokenizer/)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (0: the config's data.batch_size)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (compilation happens here: the first two steps compile)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant, alternating")
    parser.add_argument("--no-gan", action="store_true", help="leave the GAN out (loss.gan_weight=0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every process (CPU): 1, as another job's core slows any more")
    parser.add_argument("--quick", action="store_true", help="gpu_check_tiny config, batch 8, 2 steps; print only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parse_quick_args(parser, QUICK, argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the FLOPs are counted in the first (eager) step")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # the GEMM yardstick runs on the workers' thread count
    console = Console()
    start = cpu_times()
    with tempfile.TemporaryDirectory() as data_dir:
        results = compare(args, Path(data_dir), console)
    other = other_cpu_share(start)
    console.print(table(results["summary"]))
    if args.quick:
        return
    p = provenance("bench_tokenizer_train.py", sys.argv[1:], "stage1_tokenizer")
    results.update(provenance=p, other_cpu_share=other, settings={k: v for k, v in vars(args).items()
                                                                   if k not in ("worker", "overrides", "compile",
                                                                                "channels_last")})
    r, rate = results, results["peak_rate"]
    cfg = load_config(TokenizerTrainConfig, args.config)
    ae = cfg.tokenizer.autoencoder
    section = f"""## Tokenizer training step (stage 1): `run.compile` x `run.channels_last`

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
{args.threads} torch threads, torch {p['torch']}, device {r['device']}). Raw numbers:
`benchmarks/results/tokenizer_train.json`.

`TokenizerTrainer.train_step` of `{args.config}` (ch {ae.ch}, ch_mult {ae.ch_mult}, K =
{cfg.tokenizer.quantizer.codebook_size:,}; {r['parameters']['tokenizer']:,} tokenizer and
{r['parameters']['discriminator']:,} discriminator parameters) at {r['resolution']} px, batch {r['batch']},
{'fp32' if r['device'] == 'cpu' else 'bf16 autocast'}: autoencoder forward, L1 + perceptual ({r['perceptual']}:
{r['perceptual_why']}) + quantizer{'' if args.no_gan else ' + adversarial'} loss, backward, Adam{'' if args.no_gan else
'; then the discriminator forward on real and reconstructed images, hinge loss, backward, Adam'}; then the EMA
update{'' if args.no_gan else ' (the GAN on from step 0, as in the paper)'}. Each variant ran {args.repeats}
time(s) in fresh processes, alternating; the table keeps each one's fastest repeat ({args.steps} timed steps after
{args.warmup} warm-up, where compilation happens: "warm-up s", the
shortest of the repeats, as later processes read inductor's on-disk cache; the longest here
{max(x['warmup_s'] for x in r['records']):.0f} s, and minutes where that cache is cold: a fresh machine, another torch). Model FLOPs per step, counted by
`FlopCounterMode` over one eager step (every conv and matrix product of all forwards and backwards; a conv's
backward counts its input and weight gradients, 2x its forward): {r['flops_per_step'] / 1e9:,.1f} GFLOP
({r['flops_per_step'] / r['batch'] / 1e9:,.2f} per image). MFU = those x steps/s /
{rate / 1e9:,.1f} GFLOP/s, the higher of this run's two GEMM measurements
({', '.join(f"{g['flops'] / 1e9:,.1f}" for g in r['gemm_rates'])}, {r['gemm_rates'][0]['what']}). Peak MiB:
{'the RSS high-water mark during the timed steps above the RSS before them' if r['device'] == 'cpu'
 else 'max_memory_allocated over the timed steps'}. "max loss diff": the largest difference of a variant's
per-step losses from eager NCHW's over all its {args.warmup + args.steps} steps (same seed, same batch; "step 1": the
first step's, before any update, where only the arithmetic differs). Other processes used {other:.0%} of the machine's CPU time during the run.

{table(r['summary'])}
"""
    publish("tokenizer_train", results, section)


if __name__ == "__main__":
    main()
