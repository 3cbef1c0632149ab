"""`simvq draw-shapes`: each shape has its geometry's area, the same config draws the same pixels, the folder reads
as a labelled image folder, and a folder drawn otherwise is refused, not mixed."""
import hashlib

import numpy as np
import pytest

from simvq_common.errors import ConfigError
from image_data.config import DrawShapesConfig
from image_data.datasets import build_image_dataset
from image_data.shapes import SHAPES, draw_image, draw_shapes


def shape_area(shape: str, seed: int) -> float:
    """Pixels nearer the shape's colour than the ground's, with the rng of `seed` (the same for every shape:
    the same position, radius and colours)."""
    image = np.asarray(draw_image(shape, 64, np.random.default_rng(seed)), dtype=np.float64)
    corners = [image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]
    ground = max(corners, key=lambda c: sum(np.allclose(c, d, atol=2) for d in corners))  # a corner the shape misses
    fill = max(image.reshape(-1, 3), key=lambda p: np.abs(p - ground).sum())
    nearer_fill = np.abs(image - fill).sum(-1) < np.abs(image - ground).sum(-1)
    return float(nearer_fill.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shape_areas_are_their_geometry(seed):
    square = shape_area("square", seed)  # side 1.6 r
    expected = {"circle": np.pi / 2.56, "ring": np.pi * (1 - 0.55 ** 2) / 2.56, "triangle": 0.5 * 1.9 * 1.75 / 2.56,
                "diamond": 2 * 0.7 / 2.56, "plus": (4 * 0.6 - 0.36) / 2.56}
    for shape, ratio in expected.items():
        assert shape_area(shape, seed) / square == pytest.approx(ratio, rel=0.08), shape


def test_same_config_same_pixels_and_a_labelled_folder(tmp_path):
    cfg = DrawShapesConfig(out=str(tmp_path / "a"), train_per_class=3, val_per_class=2)
    draw_shapes(cfg)
    draw_shapes(DrawShapesConfig(out=str(tmp_path / "b"), train_per_class=3, val_per_class=2))

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.png"))}
    first = digest(tmp_path / "a")
    assert first == digest(tmp_path / "b") and len(first) == len(SHAPES) * 5
    assert digest(tmp_path / "a") == first and draw_shapes(cfg) == tmp_path / "a"  # a finished folder is kept

    train = build_image_dataset(str(tmp_path / "a"), "train", 32)
    assert sorted(train.class_names) == sorted(SHAPES) and len(train) == len(SHAPES) * 3
    assert len(build_image_dataset(str(tmp_path / "a"), "val", 32)) == len(SHAPES) * 2


def test_another_config_or_a_foreign_folder_is_refused(tmp_path):
    draw_shapes(DrawShapesConfig(out=str(tmp_path / "a"), train_per_class=1, val_per_class=1))
    with pytest.raises(ConfigError, match="drawn with"):
        draw_shapes(DrawShapesConfig(out=str(tmp_path / "a"), train_per_class=2, val_per_class=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a finished draw-shapes folder"):
        draw_shapes(DrawShapesConfig(out=str(tmp_path / "other")))
    with pytest.raises(ConfigError, match="not drawn"):
        draw_shapes(DrawShapesConfig(out=str(tmp_path / "c"), shapes=["hexagon"]))
