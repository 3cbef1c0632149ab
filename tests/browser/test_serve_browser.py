"""`simvq serve` in a real browser: headless Chromium (playwright, `executable_path` = $CHROMIUM or
/usr/bin/chromium) loads the page, picks a class, presses sample, and gets grid.png's pixels at the grid's size.
Not collected by `make test` (pyproject's norecursedirs); `make test-browser` runs it.

With SIMVQ_GENERATOR=DIR (a trained generator or a ready-made name) the page serves it at its recommended sampler
settings, SIMVQ_CLASS picks the class (default: the second), and the screenshot goes to docs/figures/serve.png;
without, tiny random models serve at guidance 2 and the screenshot stays in pytest's tmp directory.
"""
import io
import math
import os
import sys
from pathlib import Path
from urllib.parse import urljoin

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the tiny models of tests/test_sample.py

from pipelines.config import ServeConfig  # noqa: E402
from pipelines.serve import launch  # noqa: E402
from simvq_common.hub import resolve_model_dir  # noqa: E402
from stage2_generator.model import Generator  # noqa: E402
from test_sample import CLASS_NAMES, random_generator, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[browser]' (make test-browser)")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TRAINED = os.environ.get("SIMVQ_GENERATOR", "")
PICKED_CLASS = os.environ.get("SIMVQ_CLASS", "")
VIEWPORT = {"width": 1200, "height": 900}
NUM_IMAGES, GUIDANCE = 16, 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(URL, ServeConfig, the class to pick) of a page on a free port of 127.0.0.1."""
    if TRAINED:
        generator = TRAINED
    else:
        root = tmp_path_factory.mktemp("models")
        tokenizer = tiny_tokenizer(0)
        tokenizer.save_pretrained(root / "tokenizer")
        random_generator("class", tokenizer, root / "tokenizer").save_pretrained(root / "class")
        generator = str(root / "class")
    cfg = ServeConfig(generator=generator, port=0, out=str(tmp_path_factory.mktemp("serve")), device="cpu")
    page, url = launch(cfg)
    names = Generator.from_pretrained(resolve_model_dir(generator)).config.class_names or CLASS_NAMES
    if PICKED_CLASS and PICKED_CLASS not in names:
        pytest.fail(f"SIMVQ_CLASS={PICKED_CLASS!r} is not one of the generator's classes {names}")
    yield url, cfg, PICKED_CLASS or names[min(1, len(names) - 1)]
    page.close()


def test_the_page_samples_a_picked_class_in_chromium(server, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: set CHROMIUM=PATH")
    url, cfg, name = server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.locator("#condition input").click()
        page.get_by_role("option", name=name, exact=True).click()
        # a trained generator samples at the settings the page opens with (its sampling.yaml)
        for elem_id, value in (("num_images", NUM_IMAGES),) + ((("guidance", GUIDANCE),) if not TRAINED else ()):
            page.locator(f"#{elem_id} input[type=number]").fill(str(value))
            page.locator(f"#{elem_id} input[type=number]").press("Enter")
        page.get_by_role("button", name="sample", exact=True).click()
        image = page.locator("#grid img")
        image.wait_for(state="visible", timeout=120_000)
        sync_api.expect(page.locator("#status")).to_contain_text(f"class {name!r}", timeout=30_000)
        shown = np.array(Image.open(io.BytesIO(page.request.get(urljoin(url, image.get_attribute("src"))).body()))
                         .convert("RGB"))
        screenshot = Path(REPO / "docs/figures/serve.png" if TRAINED else tmp_path / "serve.png")
        page.screenshot(path=str(screenshot))
        browser.close()
    # the request's grid.png: a square of NUM_IMAGES samples, the one the page shows
    (request,) = [p for p in Path(cfg.out).iterdir() if p.is_dir()]
    grid = np.array(Image.open(request / "grid.png"))
    with np.load(request / "samples.npz") as data:
        side = data["arr_0"].shape[1]
        assert len(data["arr_0"]) == NUM_IMAGES
    cols = math.ceil(math.sqrt(NUM_IMAGES))
    assert shown.shape == (math.ceil(NUM_IMAGES / cols) * side, cols * side, 3)
    assert shown.std() > 0  # not a blank image
    np.testing.assert_array_equal(shown, grid)
    assert Image.open(screenshot).size == (VIEWPORT["width"], VIEWPORT["height"])
    print(f"screenshot: {screenshot}")
