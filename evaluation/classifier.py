"""Class agreement: a small image classifier trained on the train split, and the share of class-conditional
samples it assigns to the class they were drawn for.

The number means something only beside the classifier's accuracy on real held-out images, so both are
reported, with the real images' per-class accuracy weighted by the samples' class mix (a generator can at best
agree as often as the classifier is right on real images). `ratio` = agreement / that accuracy.

The default classifier (`arch: cnn6`) is a plain 6-conv network (three stages of two 3x3 convs with BatchNorm
and ReLU, max-pooling between, global average pooling, a linear head): small enough to train in minutes on a CPU
for a small labelled set such as the bundled emoji at 32 px, where timm's ImageNet-shaped networks downsample a
32 px image to one pixel before their head. For larger images or data, `arch` names any model in timm's registry
(e.g. resnet18, convnext_atto), built from scratch with the classes as its head. Either is trained with AdamW on
random flips and shifts (`simvq train-classifier`) and saved as a model directory (config.yaml,
model.safetensors, fingerprint.txt) with its held-out accuracy in eval.json.
"""
from __future__ import annotations

import difflib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simvq_common.console import console
from simvq_common.errors import ConfigError
from simvq_common.io import write_json_atomic
from simvq_common.pretrained import PretrainedModel
from simvq_common.provenance import environment

from .inputs import reference_images


@dataclass
class ClassifierConfig:
    """What rebuilds a classifier: saved as config.yaml beside its weights."""

    # left out of the fingerprint at its default (classifiers saved before it keep theirs)
    added_fields: ClassVar[tuple[str, ...]] = ("arch",)

    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    resolution: int = 32  # the image size it was trained at (others are resized to it)
    width: int = 32  # cnn6: channels of the first stage; doubled at each of the next two
    arch: str = "cnn6"  # cnn6 (the project's 6-conv network) | a model name in timm's registry (e.g. resnet18)


@dataclass
class ClassifierTrainConfig:
    data: str = "emoji"  # "emoji" (bundled) or an image folder (ImageNet layout: train/, val/)
    resolution: int = 32
    out: str = "runs/classifier"  # the classifier directory
    width: int = 32  # cnn6: channels of the first stage
    arch: str = "cnn6"  # cnn6 (the project's 6-conv network) | a model name in timm's registry (e.g. resnet18)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2.0e-3
    weight_decay: float = 0.05
    seed: int = 0
    max_images: int = 0  # the first N train images (0 = all)


OWN_ARCH = "cnn6"


def timm_network(name: str, num_classes: int) -> nn.Module:
    """A timm registry model built from scratch (no download) with `num_classes` outputs."""
    import timm

    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.5)
        raise ConfigError(f"arch={name!r} is neither {OWN_ARCH} nor a model in timm's registry"
                          + (f"; similar names: {near}" if near else "; see timm.list_models()"))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=3)


def check_arch(arch: str, resolution: int) -> None:
    """Refuse, before any data is read, an arch that is not buildable or cannot take `resolution` px images (a
    transformer with a fixed input size, say)."""
    if arch == OWN_ARCH:
        return
    network = timm_network(arch, 2).eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, resolution, resolution))
    except Exception as error:  # timm's models raise several kinds on a wrong input size
        raise ConfigError(f"arch={arch!r} cannot classify {resolution} px images ({error}); choose a convolutional "
                          f"network (e.g. resnet18) or cnn6") from error


class ImageClassifier(PretrainedModel, nn.Module):
    """uint8 or [-1, 1] images (N, 3, H, W) -> class logits (N, num_classes)."""

    config_schema, kind = ClassifierConfig, "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        if config.arch != OWN_ARCH:
            self.network = timm_network(config.arch, config.num_classes)
            return
        layers, channels = [], 3
        for stage in range(3):
            width = config.width * 2**stage
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
        if x.shape[-1] != self.config.resolution or x.shape[-2] != self.config.resolution:
            x = F.interpolate(x, size=(self.config.resolution,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        if self.config.arch != OWN_ARCH:
            return self.network(x)
        return self.head(self.features(x).mean((2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts of up to `shift` px (edge-padded), per image."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=generator)).tolist()
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])


def accuracy_by_class(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    correct = (predictions == labels).double()
    counts = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)
    per_class = [float(hits[c] / counts[c]) if counts[c] else None for c in range(num_classes)]
    return {"accuracy": float(correct.mean()), "per_class": per_class, "counts": counts.tolist()}


def train_classifier(cfg: ClassifierTrainConfig) -> Path:
    """Train on the train split, evaluate on the val split, save the directory (model + eval.json)."""
    tic = time.time()
    check_arch(cfg.arch, cfg.resolution)
    train, train_labels, class_names, described = reference_images(cfg.data, "train", cfg.resolution, cfg.max_images)
    val, val_labels, _, _ = reference_images(cfg.data, "val", cfg.resolution, 0)
    train_labels, val_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(val_labels).long()
    torch.manual_seed(cfg.seed)
    model = ImageClassifier(ClassifierConfig(len(class_names), class_names, cfg.resolution, cfg.width, cfg.arch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = augment(train[batch].float() / 127.5 - 1, generator)
            loss = F.cross_entropy(model(x), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val_accuracy = float((model.predict(val) == val_labels).double().mean())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val_accuracy})
        console.print(f"classifier epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['loss']:.3f}, "
                      f"val accuracy {val_accuracy:.3f}")
    out = Path(cfg.out)
    model.save_pretrained(out)
    val_scores = accuracy_by_class(model.predict(val), val_labels, len(class_names))
    write_json_atomic(out / "eval.json", {
        "val": val_scores, "train_accuracy": float((model.predict(train) == train_labels).double().mean()),
        "class_names": class_names, "data": described, "history": history, "config": asdict(cfg),
        "fingerprint": model.fingerprint(), "environment": environment(), "seconds": round(time.time() - tic, 1)})
    console.print(f"classifier written to {out}: val accuracy {val_scores['accuracy']:.3f}")
    return out


def class_agreement(classifier: ImageClassifier, samples: torch.Tensor, sample_labels: np.ndarray,
                    heldout: torch.Tensor, heldout_labels: np.ndarray) -> dict:
    """The share of samples classified as the class they were drawn for, beside the classifier's accuracy on real
    held-out images weighted to the samples' class mix (module doc)."""
    k = classifier.config.num_classes
    sample_labels = torch.as_tensor(np.asarray(sample_labels)).long()
    heldout_labels = torch.as_tensor(np.asarray(heldout_labels)).long()
    if sample_labels.min() < 0 or sample_labels.max() >= k:
        raise ValueError(f"sample labels must lie in [0, {k}) (the classifier's classes), got "
                         f"[{int(sample_labels.min())}, {int(sample_labels.max())}]")
    drawn = accuracy_by_class(classifier.predict(samples), sample_labels, k)
    real = accuracy_by_class(classifier.predict(heldout), heldout_labels, k)
    missing = [c for c in range(k) if drawn["counts"][c] and real["per_class"][c] is None]
    if missing:
        raise ValueError(f"classes {missing} have samples but no held-out images to measure the classifier on")
    weights = torch.tensor(drawn["counts"], dtype=torch.float64) / len(sample_labels)
    expected = float(sum(w * (real["per_class"][c] or 0.0) for c, w in enumerate(weights.tolist())))
    return {"agreement": drawn["accuracy"], "real_accuracy": expected,
            "ratio": drawn["accuracy"] / expected if expected > 0 else float("nan"),
            "per_class_agreement": drawn["per_class"], "per_class_real_accuracy": real["per_class"],
            "sample_counts": drawn["counts"], "heldout_counts": real["counts"],
            "classifier_fingerprint": classifier.fingerprint(), "class_names": classifier.config.class_names}


def load_eval(directory: str | Path) -> dict:
    path = Path(directory) / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}
