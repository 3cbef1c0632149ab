"""`simvq serve`: the page's API, called with gradio_client on a local port, draws the pixels `simvq sample`
draws for the same settings (class, prompt, image prefix); its downloads are the CLI's files (sampling.json with
both fingerprints); a bad value comes back as the page's error, naming it; the `simvq sample` line it shows
parses back to the request's config."""
import json
import os
import shlex
import zipfile
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import config_of, parse_args
from pipelines.config import SampleConfig, ServeConfig
from pipelines.sample import SEEDS_RULE, sample
from pipelines.serve import check_serve, launch, sample_command
from pipelines.text import DEFAULT_TEXT_ENCODER
from simvq_common.errors import ConfigError
from stage2_generator.config import SamplingConfig
from stage2_generator.model import Generator
from test_sample import CLASS_NAMES, GRID, PIXELS, random_generator, tiny_tokenizer

gradio_client = pytest.importorskip("gradio_client")
FORM = ("condition", "num_images", "guidance_scale", "guidance_schedule", "temperature", "top_k", "top_p", "seed",
        "prefix_image", "prefix_rows")
DEFAULTS = {"num_images": 4, "guidance_scale": 1.0, "guidance_schedule": "constant", "temperature": 1.0, "top_k": 0,
            "top_p": 1.0, "seed": 0, "prefix_image": None, "prefix_rows": 0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_models")
    tokenizer = tiny_tokenizer(0)
    tokenizer.save_pretrained(root / "tokenizer")
    for name, kw in [("class", {}), ("text", {"text_dim": 384, "text_encoder": DEFAULT_TEXT_ENCODER})]:
        random_generator(name, tokenizer, root / "tokenizer", **kw).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """name -> (gradio_client.Client, ServeConfig) of a server on a free port of 127.0.0.1, one per generator."""
    started, pages = {}, []
    for name in ("class", "text"):
        cfg = ServeConfig(generator=str(models / name), port=0, out=str(tmp_path_factory.mktemp(f"serve_{name}")),
                          max_images=16, device="cpu")
        page, url = launch(cfg)
        pages.append(page)
        assert url.startswith("http://127.0.0.1:")  # this machine only, unless host says otherwise
        client = gradio_client.Client(url, verbose=False, analytics_enabled=False,
                                      download_files=str(tmp_path_factory.mktemp(f"downloads_{name}")))
        started[name] = client, cfg
    yield started
    for page in pages:
        page.close()


def ask(servers, name, condition, **form):
    """(grid pixels, status text, {file name: downloaded path}) of one press of the sample button."""
    client, _ = servers[name]
    values = {**DEFAULTS, **form}
    if values["prefix_image"]:
        values["prefix_image"] = gradio_client.handle_file(values["prefix_image"])
    grid, status, files = client.predict(condition, *(values[key] for key in FORM[1:]), api_name="/sample")
    return np.array(Image.open(grid)), status, {Path(f).name: Path(f) for f in files}


def cli_run(models, out, generator, **kw):
    """The same request through `simvq sample`'s function: (grid pixels, samples.npz arrays)."""
    sample(SampleConfig(generator=str(models / generator), out=str(out), **kw))
    with np.load(out / "samples.npz") as data:
        return np.array(Image.open(out / "grid.png")), {key: data[key] for key in data.files}


def npz(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def test_a_class_request_draws_the_pixels_of_simvq_sample(servers, models, tmp_path, one_thread):
    form = {"num_images": 5, "guidance_scale": 2.0, "guidance_schedule": "linear", "temperature": 0.9, "top_k": 20,
            "top_p": 0.95, "seed": 7}
    grid, status, files = ask(servers, "class", "bee", **form)
    sampling = SamplingConfig(guidance_scale=2.0, guidance_schedule="linear", temperature=0.9, top_k=20, top_p=0.95,
                              seed=7)
    cli_grid, cli = cli_run(models, tmp_path, "class", classes=["bee"], num_samples=5, sampling=sampling)
    np.testing.assert_array_equal(grid, cli_grid)
    assert grid.shape == (2 * PIXELS, 3 * PIXELS, 3)  # one condition: a square of 5 (3 columns)
    served = npz(files["samples.npz"])
    for key in ("arr_0", "codes", "labels", "indices", "prompts"):
        np.testing.assert_array_equal(served[key], cli[key], err_msg=key)
    assert served["labels"].tolist() == [CLASS_NAMES.index("bee")] * 5
    assert len(np.unique(served["arr_0"].reshape(5, -1), axis=0)) == 5

    record = json.loads(files["sampling.json"].read_text())
    generator = Generator.from_pretrained(models / "class")
    assert record["generator"]["fingerprint"] == generator.fingerprint()
    assert record["tokenizer"]["fingerprint"] == generator.config.tokenizer_fingerprint
    assert record["seeds"] == SEEDS_RULE and record["config"]["sampling"]["seed"] == 7
    assert record["generator"]["fingerprint"] in status and record["tokenizer"]["fingerprint"] in status
    with zipfile.ZipFile(files["images.zip"]) as archive:
        assert sorted(archive.namelist()) == ["grid.png", *(f"png/{i:06d}.png" for i in range(5))]

    # the status's `simvq sample` line is this request's config (another out directory)
    line = status.split("the same images: `")[1].split("`")[0]
    shown = config_of(parse_args(shlex.split(line)[1:]))
    assert (shown.classes, shown.num_samples, shown.sampling) == (["bee"], 5, sampling)


def test_each_request_writes_the_cli_files_into_its_own_directory(servers):
    _, _, first = ask(servers, "class", "ant", num_images=2)
    _, _, second = ask(servers, "class", "ant", num_images=2)
    out = Path(servers["class"][1].out)
    directories = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(directories) >= 2
    for directory in directories:
        assert {"samples.npz", "grid.png", "sampling.json", "kind.txt", "png"} <= {p.name for p in directory.iterdir()}
    # the same settings give the same images, request after request
    np.testing.assert_array_equal(npz(first["samples.npz"])["arr_0"], npz(second["samples.npz"])["arr_0"])


def test_a_prompt_request_draws_the_pixels_of_simvq_sample(servers, models, tmp_path, one_thread):
    grid, status, files = ask(servers, "text", "a red heart", num_images=3, guidance_scale=1.5, seed=3)
    cli_grid, cli = cli_run(models, tmp_path, "text", prompts=["a red heart"], num_samples=3,
                            sampling=SamplingConfig(guidance_scale=1.5, seed=3))
    np.testing.assert_array_equal(grid, cli_grid)
    served = npz(files["samples.npz"])
    np.testing.assert_array_equal(served["arr_0"], cli["arr_0"])
    assert served["prompts"].tolist() == ["a red heart"] * 3
    assert json.loads(files["sampling.json"].read_text())["text_encoder"]["name"] == DEFAULT_TEXT_ENCODER
    assert "prompt 'a red heart'" in status


def test_an_uploaded_image_prefix_completes_as_simvq_sample_does(servers, models, tmp_path, one_thread):
    pixels = np.random.default_rng(0).integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "face.png")
    _, _, files = ask(servers, "class", "cat", num_images=3, prefix_image=str(tmp_path / "face.png"), prefix_rows=2)
    _, cli = cli_run(models, tmp_path / "cli", "class", classes=["cat"], num_samples=3,
                     prefix_image=str(tmp_path / "face.png"), prefix_rows=2)
    served = npz(files["samples.npz"])
    np.testing.assert_array_equal(served["codes"], cli["codes"])
    np.testing.assert_array_equal(served["arr_0"], cli["arr_0"])
    row = GRID[1]
    assert (served["codes"][:, :2 * row] == served["codes"][:1, :2 * row]).all()  # the top 2 rows: the image's
    record = json.loads(files["sampling.json"].read_text())
    assert record["prefix"]["rows"] == 2 and Path(record["prefix"]["image"]).is_file()  # kept beside the samples


@pytest.mark.parametrize("name, condition, form, message", [
    ("class", "zebra", {}, r"unknown class\(es\) \['zebra'\]: the generator's classes are names \['ant', 'bee'"),
    ("class", "ant", {"top_p": 0.0}, r"top_p=0.0 \(in \(0, 1\]\) out of range"),
    ("class", "ant", {"prefix_rows": 2}, "prefix rows = 2 needs an image to complete: upload one"),
    ("class", "ant", {"num_images": 17}, "17 is greater than maximum value 16"),  # the slider's bound: max_images
    ("text", "   ", {}, "the prompt is empty: type what the images should show"),
    ("class", "ant", {"seed": None}, "seed: empty; give each a value"),
])
def test_a_bad_value_comes_back_as_the_pages_error(servers, name, condition, form, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        ask(servers, name, condition, **form)


def test_prefix_rows_out_of_range_is_refused_by_the_samplers_check(servers, tmp_path):
    Image.new("RGB", (PIXELS, PIXELS)).save(tmp_path / "black.png")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"prefix_rows=0: set it in \[1, 3\]"):
        ask(servers, "class", "ant", prefix_image=str(tmp_path / "black.png"), prefix_rows=0)


def test_the_shown_sample_line_reads_back_names_with_shell_and_override_characters():
    cfg = SampleConfig(generator="runs/g", tokenizer="runs/t", classes=["Animals & Nature"], num_samples=3,
                       sampling=SamplingConfig(top_p=0.5, seed=4))
    back = config_of(parse_args(shlex.split(sample_command(cfg))[1:]))
    assert (back.generator, back.tokenizer, back.classes, back.num_samples, back.sampling) == (
        "runs/g", "runs/t", ["Animals & Nature"], 3, cfg.sampling)
    prompt = 'a "quoted" cat, with a comma, ${x}, a back\\slash and it\'s [bracketed]'
    back = config_of(parse_args(shlex.split(sample_command(SampleConfig(generator="g", tokenizer="t",
                                                                        prompts=[prompt])))[1:]))
    assert back.prompts == [prompt]


@pytest.mark.parametrize("override, message", [({"generator": ""}, "set --generator DIR"),
                                              ({"port": 70000}, "port=70000"), ({"max_images": 0}, "max_images=0")])
def test_bad_server_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        check_serve(ServeConfig(**{"generator": "g", **override}))


def test_serve_parses_its_flags():
    cfg = config_of(parse_args(["serve", "--generator", "G", "--host", "0.0.0.0", "--port", "0", "max_images=8"]))
    assert (cfg.generator, cfg.host, cfg.port, cfg.max_images) == ("G", "0.0.0.0", 0, 8)
    assert config_of(parse_args(["serve", "--generator", "G"])).host == "127.0.0.1"
