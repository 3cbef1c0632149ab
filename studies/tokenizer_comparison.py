"""Tokenizers compared under one budget: train each (quantizer kind, codebook size), evaluate, tabulate.

Every run is an ordinary train-tokenizer run directory (resumable: rerunning the command continues
unfinished runs and re-evaluates finished ones) built from one base config with the quantizer swapped.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from simvq_common.config import load_config
from simvq_common.io import write_json_atomic
from simvq_common.markdown import write_section
from simvq_common.provenance import command_line, environment
from stage1_tokenizer.config import TokenizerEvalConfig, TokenizerTrainConfig
from stage1_tokenizer.evaluate import evaluate_tokenizer
from stage1_tokenizer.train import train_tokenizer
from stage1_tokenizer.quantizers import display_name
from studies.config import TokenizerComparisonConfig


def run_name(kind: str, codebook_size: int, seed: int = 0) -> str:
    """The run directory's name under out_dir: seed 0 is the comparison's own run."""
    return f"{kind}_K{codebook_size}" + (f"_seed{seed}" if seed else "")


def run_config(cfg: TokenizerComparisonConfig, kind: str, codebook_size: int, seed: int = 0) -> TokenizerTrainConfig:
    """One tokenizer run of the comparison: the base config with the quantizer swapped; a `seed` other than 0
    reseeds the weights, the data order and the initial / frozen codebook (run.seed, tokenizer.quantizer.seed)."""
    reseed = [f"run.seed={seed}", f"tokenizer.quantizer.seed={seed}"] if seed else []
    return load_config(TokenizerTrainConfig, cfg.base_config, [
        *cfg.overrides, f"tokenizer.quantizer.kind={kind}", f"tokenizer.quantizer.codebook_size={codebook_size}",
        *reseed, f"run.out_dir={Path(cfg.out_dir) / run_name(kind, codebook_size, seed)}"])


def run_comparison(cfg: TokenizerComparisonConfig) -> list[dict]:
    results = []
    for codebook_size in cfg.codebook_sizes:
        for kind in cfg.kinds:
            train_cfg = run_config(cfg, kind, codebook_size)
            tokenizer_dir = train_tokenizer(train_cfg)
            result = evaluate_tokenizer(TokenizerEvalConfig(
                tokenizer=str(tokenizer_dir), data=train_cfg.data.source, split="val",
                resolution=train_cfg.data.resolution, perceptual=cfg.eval_perceptual, fid_source=cfg.eval_fid_source))
            results.append({"kind": kind, "codebook_size": codebook_size, "steps": train_cfg.run.steps, **result})
    write_json_atomic(Path(cfg.out_dir) / "results.json", {"config": asdict(cfg), "results": results})
    if cfg.results_md:
        write_section(cfg.results_md, "tokenizer-comparison", comparison_section(cfg, results),
                      heading="## Tokenizers on the bundled emoji: plain VQ vs SimVQ", intro="# Results\n")
    return results


def comparison_section(cfg: TokenizerComparisonConfig, results: list[dict]) -> str:
    rows = ["| quantizer | K | rFID | PSNR (dB) | SSIM | LPIPS | util | perplexity |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lpips = f"{r['lpips']:.3f}" if r["lpips"] is not None else "-"
        rows.append(f"| {display_name(r['kind'])} | {r['codebook_size']:,} | {r['rfid']:.1f} | {r['psnr']:.2f} | "
                    f"{r['ssim']:.3f} | {lpips} | {r['utilisation']:.1%} | {r['perplexity']:,.0f} |")
    first = results[0]
    fid, lpips = first["conventions"]["rfid"], first["conventions"]["lpips"]
    env = environment()
    return f"""Command: `{cfg.command or command_line()}`

Each tokenizer: `{cfg.base_config}` {' '.join(cfg.overrides)} with the quantizer swapped, {first['steps']} steps, the
same seed and data order. Evaluated on the emoji val split ({first['num_images']} images at {first['resolution']} px,
center crop): rFID of the reconstructions against the originals ({fid['suite']}, Inception source
{fid['inception_source']}, weights sha256 {fid['weights_sha256'][:12]}..., {fid['num_generated']} images: at this N the
FID is biased upward and comparable only within this table); PSNR and SSIM per image then averaged; LPIPS
backend {lpips['backend'] if lpips else 'none'}{'' if not lpips or lpips.get('comparable_to_standard_lpips', True) else ' (shift-tolerant: not comparable with standard LPIPS numbers)'};
utilisation over all val tokens. simvq-gen {env['git']}, torch {env['torch']}, {env['cpu_count']} CPU cores.

{chr(10).join(rows)}
"""
