"""Build the bundled emoji dataset from the npm packages emoji-datasource-google@16.0.0 and emojibase-data@16.0.3.

    python scripts/build_emoji_dataset.py [--package-dir DIR] [--emojibase-dir DIR] [--out PATH]

Without the directories the script runs `npm pack` itself (needs npm and the registry). The
output is one compressed .npz: 64x64 RGB images composited on white, category labels (the
9 real categories; "Component" swatches are dropped), subcategories, the Unicode character names
(`names`: "heavy black heart", "slice of pizza") and the CLDR names people call the emoji by (`cldr_names`:
"red heart", "pizza"; emojibase's English labels), the captions; codepoints, the variant group of every image,
and a fixed 90/10 train/val split of whole
groups, stratified by category: every variant of one emoji (skin tones, gender, hair, direction,
presentation selectors) falls on one side, so val holds no sibling of a train image (docs/DATA.md).
The images are Apache-2.0 (Google Noto emoji); see image_data/assets/NOTICE_noto_emoji.txt.
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
EMOJIBASE = "emojibase-data@16.0.3"
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium",
              "1F3FE": "medium-dark", "1F3FF": "dark"}
VAL_FRACTION = 0.1
SPLIT_SEED = 0

# Modifiers that make a variant of the same emoji rather than another one (inside sequences).
SKIN_TONE_CODEPOINTS = set(SKIN_TONES)
PRESENTATION = {"FE0E", "FE0F"}
ZWJ = "200D"
GENDER_SIGNS = {"2640", "2642"}
HAIR = {"1F9B0", "1F9B1", "1F9B2", "1F9B3"}  # red, curly, white hair, bald
FACING_RIGHT = "27A1"
# The person codepoints a gendered sequence starts from: adults, children, elders are each one person.
PERSON_CLASSES = {"1F468": "adult", "1F469": "adult", "1F9D1": "adult", "1F466": "child", "1F467": "child",
                  "1F9D2": "child", "1F474": "elder", "1F475": "elder", "1F9D3": "elder"}
# Gender variants Unicode encodes as separate codepoints, keyed to one of their siblings' keys.
GENDERED_SIBLINGS = {
    ("1F46C",): ("1F46B",), ("1F46D",): ("1F46B",),  # two men / two women / man and woman holding hands
    ("adult", "1F91D", "adult"): ("1F46B",),  # people holding hands
    ("1F934",): ("1F478",), ("1FAC5",): ("1F478",),  # prince / person with crown / princess
    ("1FAC3",): ("1F930",), ("1FAC4",): ("1F930",),  # pregnant man / person / woman
    ("1F936",): ("1F385",), ("adult", "1F384"): ("1F385",),  # mrs claus / mx claus / santa
    ("1F57A",): ("1F483",),  # man dancing / woman dancing
    ("adult", "2764", "1F48B", "adult"): ("1F48F",),  # kiss: woman, man ... / kiss
    ("adult", "2764", "adult"): ("1F491",),  # couple with heart: woman, man ... / couple with heart
    ("adult", "adult", "child"): ("1F46A",),  # family: man, woman, boy ... / family
}


def fetch_package(spec: str, workdir: Path) -> Path:
    """`npm pack` the package `spec` (name@version) into workdir and unpack it; its directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", spec], cwd=workdir, check=True, capture_output=True)
    (tgz,) = workdir.glob("*.tgz")
    with tarfile.open(tgz) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def _without_presentation(unified: str) -> str:
    return "-".join(c for c in unified.upper().split("-") if c not in PRESENTATION)


def cldr_names(emojibase_dir: Path, rows: list[dict]) -> list[str]:
    """Each row's CLDR name (emojibase's English label, skin-tone variants included), matched on codepoints
    without presentation selectors."""
    labels = {}
    for emoji in json.loads((emojibase_dir / "en" / "data.json").read_text()):
        for entry in [emoji, *(emoji.get("skins") or [])]:
            labels[_without_presentation(entry["hexcode"])] = entry["label"]
    missing = [r["unified"] for r in rows if _without_presentation(r["unified"]) not in labels]
    if missing:
        raise SystemExit(f"{len(missing)} emoji have no label in {emojibase_dir}, e.g. {missing[:5]}: "
                         f"give the emojibase-data release that matches {PACKAGE} ({EMOJIBASE})")
    return [labels[_without_presentation(r["unified"])] for r in rows]


def list_entries(package_dir: Path) -> list[dict]:
    """One row per image (base emoji and each skin-tone variant), in the package's sort order."""
    rows = []
    for emoji in sorted(json.loads((package_dir / "emoji.json").read_text()), key=lambda e: e["sort_order"]):
        if emoji["category"] == "Component" or not emoji["has_img_google"]:
            continue
        base = dict(category=emoji["category"], subcategory=emoji["subcategory"])
        base["family"] = emoji["unified"]  # the entry a skin-tone variant belongs to
        rows.append(dict(base, name=emoji["name"].lower(), image=emoji["image"], unified=emoji["unified"]))
        for tones, variant in sorted(emoji.get("skin_variations", {}).items()):
            if not variant["has_img_google"]:
                continue
            tone = ", ".join(SKIN_TONES[t] for t in tones.split("-"))
            rows.append(dict(base, name=f"{emoji['name'].lower()}: {tone} skin tone",
                             image=variant["image"], unified=variant["unified"]))
    return rows


def variant_key(unified: str) -> tuple[str, ...]:
    """What all variants of one emoji share: its codepoints without tone, gender, hair, direction,
    presentation and joiners, with the person it is built on reduced to adult / child / elder; a joined
    sequence on a non-person emoji reduces to that emoji (its recolourings and attributes are variants)."""
    codepoints = unified.upper().split("-")
    in_sequence = ZWJ in codepoints
    dropped = SKIN_TONE_CODEPOINTS | PRESENTATION | {ZWJ}
    if in_sequence:
        dropped |= GENDER_SIGNS | HAIR | {FACING_RIGHT}
    key = tuple(PERSON_CLASSES.get(c, c) for c in codepoints if c not in dropped)
    if in_sequence and key[0] not in PERSON_CLASSES.values():
        key = key[:1]  # a joined sequence drawn on another emoji (black cat, heart on fire) goes with it
    return GENDERED_SIBLINGS.get(key, key)


def variant_groups(rows: list[dict]) -> np.ndarray:
    """One group id per row (0, 1, ... in order of first appearance), rows of one emoji's variants alike.

    Skin tones go with the entry they are listed under (some, like handshake's, use other codepoints);
    the entries themselves are grouped by `variant_key`.
    """
    ids: dict[tuple[str, ...], int] = {}
    return np.array([ids.setdefault(variant_key(r["family"]), len(ids)) for r in rows], dtype=np.int64)


def load_on_white(path: Path, size: int) -> np.ndarray:
    rgba = Image.open(path).convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def grouped_split(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """0 = train, 1 = val: whole groups, about VAL_FRACTION of every category's images, by a fixed seed.

    Groups are visited in a seeded random order and go to val while they fit the category's quota, so val
    gets the quota (or just under) without splitting any group. A group's category is its first row's (a few
    groups span two, e.g. eye / eye in speech bubble, so a category's val share can differ by an image or so).
    """
    rng = np.random.default_rng(SPLIT_SEED)
    split = np.zeros(len(labels), dtype=np.uint8)
    group_ids, first_rows, sizes = np.unique(groups, return_index=True, return_counts=True)
    for c in np.unique(labels):
        quota = max(1, round(VAL_FRACTION * int((labels == c).sum())))
        taken = 0
        for g in rng.permutation(np.flatnonzero(labels[first_rows] == c)):
            if taken + sizes[g] <= quota:
                split[groups == group_ids[g]] = 1
                taken += sizes[g]
    return split


def build(package_dir: Path, emojibase_dir: Path, out: Path, size: int = 64) -> None:
    rows = list_entries(package_dir)
    categories = sorted({r["category"] for r in rows})
    labels = np.array([categories.index(r["category"]) for r in rows], dtype=np.int64)
    groups = variant_groups(rows)
    images = np.stack([load_on_white(package_dir / "img" / "google" / "64" / r["image"], size) for r in rows])
    version = json.loads((package_dir / "package.json").read_text())["version"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=images,
        labels=labels,
        split=grouped_split(labels, groups),
        groups=groups,
        categories=np.array(categories),
        subcategories=np.array([r["subcategory"] for r in rows]),
        names=np.array([r["name"] for r in rows]),
        cldr_names=np.array(cldr_names(emojibase_dir, rows)),
        codepoints=np.array([r["unified"] for r in rows]),
        source=np.array(f"npm emoji-datasource-google@{version}, img/google/64, composited on white"),
    )
    print(f"wrote {out}: {len(rows)} images in {groups.max() + 1} variant groups, {len(categories)} categories, "
          f"{out.stat().st_size / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package-dir", type=Path, help=f"an unpacked {PACKAGE} package")
    parser.add_argument("--emojibase-dir", type=Path, help=f"an unpacked {EMOJIBASE} package")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                        / "image_data" / "assets" / "noto_emoji_64.npz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        package_dir = args.package_dir or fetch_package(PACKAGE, Path(tmp) / "images")
        emojibase_dir = args.emojibase_dir or fetch_package(EMOJIBASE, Path(tmp) / "names")
        build(package_dir, emojibase_dir, args.out)


if __name__ == "__main__":
    main()
