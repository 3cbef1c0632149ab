"""Build the bundled emoji dataset from the npm package emoji-datasource-google@16.0.0.

    python scripts/build_emoji_dataset.py [--package-dir DIR] [--out PATH]

Without --package-dir the script runs `npm pack` itself (needs npm and the registry). The
output is one compressed .npz: 64x64 RGB images composited on white, category labels (the
9 real categories; "Component" swatches are dropped), subcategories, names usable as
captions, codepoints, and a fixed, category-stratified 90/10 train/val split.
The images are Apache-2.0 (Google Noto emoji); see stage1_tokenizer/assets/NOTICE_noto_emoji.txt.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE = "emoji-datasource-google@16.0.0"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium",
              "1F3FE": "medium-dark", "1F3FF": "dark"}
VAL_FRACTION = 0.1
SPLIT_SEED = 0


def fetch_package(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE], cwd=workdir, check=True, capture_output=True)
    (tgz,) = workdir.glob("emoji-datasource-google-*.tgz")
    with tarfile.open(tgz) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def list_entries(package_dir: Path) -> list[dict]:
    """One row per image (base emoji and each skin-tone variant), in the package's sort order."""
    rows = []
    for emoji in sorted(json.loads((package_dir / "emoji.json").read_text()), key=lambda e: e["sort_order"]):
        if emoji["category"] == "Component" or not emoji["has_img_google"]:
            continue
        base = dict(category=emoji["category"], subcategory=emoji["subcategory"])
        rows.append(dict(base, name=emoji["name"].lower(), image=emoji["image"], unified=emoji["unified"]))
        for tones, variant in sorted(emoji.get("skin_variations", {}).items()):
            if not variant["has_img_google"]:
                continue
            tone = ", ".join(SKIN_TONES[t] for t in tones.split("-"))
            rows.append(dict(base, name=f"{emoji['name'].lower()}: {tone} skin tone",
                             image=variant["image"], unified=variant["unified"]))
    return rows


def load_on_white(path: Path, size: int) -> np.ndarray:
    rgba = Image.open(path).convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def stratified_split(labels: np.ndarray) -> np.ndarray:
    """0 = train, 1 = val: VAL_FRACTION of every category, chosen by a fixed seed."""
    rng = np.random.default_rng(SPLIT_SEED)
    split = np.zeros(len(labels), dtype=np.uint8)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        split[members[: max(1, round(VAL_FRACTION * len(members)))]] = 1
    return split


def build(package_dir: Path, out: Path, size: int = 64) -> None:
    rows = list_entries(package_dir)
    categories = sorted({r["category"] for r in rows})
    labels = np.array([categories.index(r["category"]) for r in rows], dtype=np.int64)
    images = np.stack([load_on_white(package_dir / "img" / "google" / "64" / r["image"], size) for r in rows])
    version = json.loads((package_dir / "package.json").read_text())["version"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=images,
        labels=labels,
        split=stratified_split(labels),
        categories=np.array(categories),
        subcategories=np.array([r["subcategory"] for r in rows]),
        names=np.array([r["name"] for r in rows]),
        codepoints=np.array([r["unified"] for r in rows]),
        source=np.array(f"npm emoji-datasource-google@{version}, img/google/64, composited on white"),
    )
    print(f"wrote {out}: {len(rows)} images, {len(categories)} categories, {out.stat().st_size / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package-dir", type=Path, help="an unpacked emoji-datasource-google package")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                        / "stage1_tokenizer" / "assets" / "noto_emoji_64.npz")
    args = parser.parse_args()
    if args.package_dir is not None:
        build(args.package_dir, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(fetch_package(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
