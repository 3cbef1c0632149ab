"""`simvq evaluate`: FID, sFID, IS, KID and precision/recall of generated samples against a reference.

The samples are a `simvq sample` directory or any .npz with `arr_0` (uint8 NHWC, the ADM suite's layout,
so other systems' samples are measured by the same code). The reference is the bundled emoji or an image
folder (a split of it, centre-cropped to the samples' resolution, as stage 1 evaluates), an ADM reference
batch (VIRTUAL_imagenet256_labeled.npz: its stored statistics, its images for KID and precision/recall), or
statistics saved earlier. Features come from the standard FID Inception through torch-fidelity
(evaluation.fid); reference statistics are cached on disk by content. metrics.json records the suite and
its version, the extractor and its weights' hash, the resizing, where every reference statistic came from,
the sample counts and class histograms, the reference and the fingerprints of the models behind the samples.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from evaluation.classifier import ImageClassifier, class_agreement, load_eval
from evaluation.fid import compute_metrics, reference_stats
from evaluation.fid_reference import load_reference_file, save_reference_stats
from evaluation.inputs import class_mix, load_samples, reference_images
from evaluation.memorisation import memorisation
from simvq_common import distributed
from simvq_common.console import console
from simvq_common.errors import UserError
from simvq_common.hub import resolve_model_dir
from simvq_common.io import write_json_atomic
from simvq_common.provenance import environment

from .config import EvaluateConfig

INCEPTION_METRICS = ("fid", "sfid", "isc", "kid", "prc")
METRICS = (*INCEPTION_METRICS, "agreement", "memorisation")  # the last two: evaluation/classifier.py, memorisation.py


def evaluate(cfg: EvaluateConfig) -> dict:
    unknown = sorted(set(cfg.metrics) - set(METRICS))
    if unknown or not cfg.metrics:
        raise UserError(f"metrics={cfg.metrics}: choose from {list(METRICS)}")
    if not cfg.samples:
        raise UserError("set samples=DIR (a `simvq sample` output directory, or an .npz with arr_0)")
    tic = time.time()
    distributed.setup()  # join the launcher's group, if any (a lone process joins none)
    device = distributed.device_for(cfg.device)
    generated, npz, sampling, sample_labels = load_samples(cfg.samples)
    resolution = generated.shape[-1]
    wanted = set(cfg.metrics)
    reference_labels = class_names = None
    if cfg.reference.endswith(".npz"):
        reference = load_reference_file(cfg.reference, wanted)
        described = {"kind": reference["layout"], "path": str(Path(cfg.reference).resolve()),
                     "arrays": reference["arrays"], "description": reference.get("description", ""),
                     "num_images": reference["num"]}
    else:
        reference, reference_labels, class_names, described = reference_images(
            cfg.reference, cfg.reference_split, resolution, cfg.max_reference)
    result = {"provenance": None, "reference_hash": None}
    if wanted & set(INCEPTION_METRICS):
        result = compute_metrics(generated, reference, fid="fid" in wanted, sfid="sfid" in wanted,
                                 isc="isc" in wanted, kid="kid" in wanted, prc="prc" in wanted, source=cfg.fid_source,
                                 batch_size=cfg.batch_size, device=device,
                                 kid_subset_size=cfg.kid_subset_size or None)
    if cfg.tokenizer_rfid > 0 and "fid" in result:
        result["fid_over_rfid"] = result["fid"] / cfg.tokenizer_rfid
    if "agreement" in wanted:
        result["agreement"] = agreement_of(cfg, generated, sample_labels, reference, reference_labels)
    if "memorisation" in wanted:
        if described["kind"] != "images":
            raise UserError("metrics=[memorisation] needs reference images with a train split (reference=emoji or "
                            "an image folder), not a .npz file")
        train, _, _, _ = reference_images(cfg.reference, cfg.train_split, resolution, cfg.max_train)
        result["memorisation"] = memorisation(generated, train, reference, fid_source=cfg.fid_source,
                                              batch_size=cfg.batch_size, device=device)
    if cfg.save_reference_stats:
        if described["kind"] != "images":
            raise UserError("save_reference_stats needs reference images (a folder or split), not a .npz file")
        stats = reference_stats(reference, cfg.fid_source, cfg.batch_size, device=device)
        save_reference_stats(cfg.save_reference_stats, stats, json.dumps(described))
        described["saved_statistics"] = str(Path(cfg.save_reference_stats).resolve())
    out = Path(cfg.out) if cfg.out else npz.with_name("metrics.json")
    report = {
        **{k: v for k, v in result.items() if k != "provenance"},
        "samples": {"path": str(npz.resolve()), "num": len(generated), "resolution": resolution,
                    "generator_fingerprint": sampling.get("generator", {}).get("fingerprint"),
                    "tokenizer_fingerprint": sampling.get("tokenizer", {}).get("fingerprint")},
        "reference": {**described, "hash": result["reference_hash"]},
        "class_mix": class_mix(sample_labels, reference_labels, class_names),
        "inception": result["provenance"],
        "config": asdict(cfg), "environment": environment(), "seconds": round(time.time() - tic, 1),
    }
    write_json_atomic(out, report)
    console.print(f"metrics written to {out}")
    return report


def agreement_of(cfg: EvaluateConfig, generated: torch.Tensor, sample_labels: np.ndarray | None,
                 reference: torch.Tensor, reference_labels: np.ndarray | None) -> dict:
    """Class agreement of labelled samples under cfg.classifier, beside its accuracy on the reference images."""
    if not cfg.classifier:
        raise UserError("metrics=[agreement] needs classifier=DIR (`simvq train-classifier` output, or a ready-made "
                        "classifier's name)")
    if sample_labels is None or (np.asarray(sample_labels) < 0).any():
        raise UserError(f"metrics=[agreement] needs class-conditional samples: {cfg.samples} has no class labels")
    if reference_labels is None:
        raise UserError("metrics=[agreement] needs labelled reference images (reference=emoji or an image folder), "
                        f"not {cfg.reference}")
    classifier = ImageClassifier.from_pretrained(cfg.classifier)
    return {**class_agreement(classifier, generated, sample_labels, reference, reference_labels),
            "classifier": str(cfg.classifier), "classifier_val_accuracy": load_eval(
                resolve_model_dir(cfg.classifier)).get("val", {}).get("accuracy")}


def result_table(result: dict):
    """The headline metrics of an evaluate result, as a rich table."""
    from rich.table import Table

    extra = {"fid_over_rfid": result.get("fid_over_rfid"),
             "agreement": (result.get("agreement") or {}).get("agreement"),
             "agreement_ratio": (result.get("agreement") or {}).get("ratio"),
             "copies_px": ((result.get("memorisation") or {}).get("pixels") or {}).get("near_copies"),
             "nn_ratio_px": ((result.get("memorisation") or {}).get("pixels") or {}).get("ratio"),
             "nn_ratio_incep": ((result.get("memorisation") or {}).get("inception") or {}).get("ratio")}
    result = {**result, **{k: v for k, v in extra.items() if v is not None}}
    names = [k for k in ("fid", "sfid", "isc_mean", "kid_mean", "precision", "recall", *extra) if k in result]
    table = Table(title=f"{result['samples']['num']} samples vs {result['reference']['num_images']} reference images "
                        + (f"({result['inception_source']} Inception, {result['suite']})" if "suite" in result else ""))
    for name in names:
        table.add_column(name, justify="right")
    table.add_row(*(f"{result[k]:.4g}" for k in names))
    return table
