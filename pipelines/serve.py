"""`simvq serve`: a page in the browser that samples one generator interactively (Gradio).

The generator, its tokenizer and a text generator's encoder load once, at start. Each request becomes a
SampleConfig (one class or one prompt, num_samples images, first_index 0) drawn by pipelines.sample.sample_with
into a new directory under `out`: its samples.npz, grid.png, PNGs and sampling.json are the files `simvq sample`
writes for the same settings, and the page shows grid.png itself, with the seeds rule, both fingerprints and the
`simvq sample` line that redraws the same images. Requests queue and are drawn one at a time, so two users cannot
double the memory; a bad value comes back to the page as the UserError's message. The page binds to 127.0.0.1
unless `host` says otherwise (0.0.0.0: the network), and never makes a share link.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.conditionings import request_kind
from pipelines.conditions import generator_text_encoder
from pipelines.config import SampleConfig, ServeConfig
from pipelines.sample import SEEDS_RULE, Models, load_models, sample_with
from simvq_common.console import console
from simvq_common.errors import ConfigError, UserError
from simvq_common.hub import resolve_model_dir
from stage2_generator.conditionings import conditioning_for
from stage2_generator.config import SamplingConfig, recommended_sampling

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls home
GUIDANCE_MAX, TEMPERATURE_MAX = 10.0, 2.0  # the sliders' ends (sampling itself takes any value >= 0)
GRID_HEIGHT = 400  # px on the page
# the grid fills its box, its small samples scaled up sharp
CSS = "#grid img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@dataclass
class Request:
    """One press of the sample button: the form's values, in the order of the page's inputs (and of its API)."""

    condition: str  # a class name or id (class-conditional), a prompt (text-conditional); ignored otherwise
    num_images: int
    guidance_scale: float
    guidance_schedule: str
    temperature: float
    top_k: int
    top_p: float
    seed: int
    prefix_image: str | None  # an uploaded image's path: its top prefix_rows code rows are kept
    prefix_rows: int


def check_serve(cfg: ServeConfig) -> None:
    if not cfg.generator:
        raise ConfigError("set --generator DIR (a directory written by `simvq train-generator`) or a Hub id")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port={cfg.port}: choose one in [1, 65535], or 0 for any free port")
    if cfg.max_images < 1 or cfg.queue_size < 1 or cfg.batch_size < 1:
        raise ConfigError(f"max_images={cfg.max_images}, queue_size={cfg.queue_size} and batch_size={cfg.batch_size} "
                          f"must be >= 1")


def request_config(cfg: ServeConfig, models: Models, request: Request, out: Path) -> SampleConfig:
    """The `simvq sample` config of a request, its images written into `out` (an uploaded prefix copied there)."""
    model_cfg = models.generator.config
    empty = [key for key, value in asdict(request).items()
             if value is None and key not in ("condition", "prefix_image")]
    if empty:
        raise UserError(f"{', '.join(empty)}: empty; give each a value")
    if not 1 <= request.num_images <= cfg.max_images:
        raise UserError(f"number of images = {request.num_images}: choose 1 to {cfg.max_images} (the server's "
                        f"max_images)")
    wanted = request_kind(model_cfg).serve_request((request.condition or "").strip())
    prefix = ""
    if request.prefix_image:
        prefix = str(out / f"prefix{Path(request.prefix_image).suffix or '.png'}")
        shutil.copyfile(request.prefix_image, prefix)  # kept beside the samples: sampling.json names it
    elif request.prefix_rows:
        raise UserError(f"prefix rows = {request.prefix_rows} needs an image to complete: upload one, or set the "
                        f"rows to 0")
    sampling = SamplingConfig(guidance_scale=float(request.guidance_scale), guidance_schedule=request.guidance_schedule,
                              temperature=float(request.temperature), top_k=int(request.top_k),
                              top_p=float(request.top_p), seed=int(request.seed))
    return SampleConfig(generator=cfg.generator, tokenizer=models.tokenizer_dir, out=str(out),
                        num_samples=int(request.num_images), **wanted, prefix_image=prefix,
                        prefix_rows=int(request.prefix_rows) if prefix else 0, batch_size=cfg.batch_size,
                        sampling=sampling, save_pngs=True, device=cfg.device)


def quoted_item(item: str) -> str:
    """An item of a list override, read back as it is: double-quoted, or single-quoted (' doubled, interpolations
    escaped) when it holds what double quotes would escape."""
    if not any(special in item for special in ('"', "\\", "${")):
        return f'"{item}"'
    return "'" + item.replace("'", "''").replace("${", "\\${") + "'"


def sample_command(cfg: SampleConfig) -> str:
    """The `simvq sample` line that draws the same images as the request `cfg` (into another directory)."""
    words = ["simvq", "sample", "--generator", cfg.generator, "--tokenizer", cfg.tokenizer, "--out", "runs/s"]
    words += [f"{key}=[{','.join(map(quoted_item, getattr(cfg, key)))}]" for key in ("classes", "prompts")
              if getattr(cfg, key)]
    words.append(f"num_samples={cfg.num_samples}")
    if cfg.prefix_image:
        words += [f"prefix_image={cfg.prefix_image}", f"prefix_rows={cfg.prefix_rows}"]
    words += [f"sampling.{key}={getattr(cfg.sampling, key)}"
              for key in ("guidance_scale", "guidance_schedule", "temperature", "top_k", "top_p", "seed")]
    return shlex.join(words)


def images_zip(out: Path) -> Path:
    """out/images.zip: grid.png and the PNG of every sample (png/{index:06d}.png), stored as they are."""
    path = out / "images.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for png in [out / "grid.png", *sorted((out / "png").glob("*.png"))]:
            archive.write(png, png.relative_to(out))
    return path


def answer(cfg: ServeConfig, models: Models, request: Request) -> tuple[str, str, list[str]]:
    """(grid.png, the status text, the files to download) of one request; a UserError becomes the page's error."""
    import gradio as gr

    out = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=Path(cfg.out)))
    try:
        sample_cfg = request_config(cfg, models, request, out)
        meta = sample_with(models, sample_cfg)
    except UserError as err:
        shutil.rmtree(out, ignore_errors=True)
        raise gr.Error(str(err)) from None
    what = (f"class {sample_cfg.classes[0]!r}" if sample_cfg.classes else
            f"prompt {sample_cfg.prompts[0]!r}" if sample_cfg.prompts else "unconditional")
    status = (f"{sample_cfg.num_samples} image(s), {what}, in {meta['seconds']:.1f} s -> `{out}`\n\n"
              f"generator `{meta['generator']['fingerprint']}`, tokenizer `{meta['tokenizer']['fingerprint']}`\n\n"
              f"the same images: `{sample_command(sample_cfg)}`")
    return str(out / "grid.png"), status, [str(images_zip(out)), str(out / "samples.npz"), str(out / "sampling.json")]


def header(cfg: ServeConfig, models: Models) -> str:
    model_cfg = models.generator.config
    kind = request_kind(model_cfg).summary(model_cfg)
    rows, cols = model_cfg.grid
    return (f"## simvq sampler\n**generator** `{cfg.generator}`: fingerprint `{models.generator_fingerprint}`, "
            f"size {model_cfg.size}, {kind}, {rows}x{cols} codes of K = {model_cfg.codebook_size:,}  \n"
            f"**tokenizer** `{models.tokenizer_dir}`: fingerprint `{model_cfg.tokenizer_fingerprint}`  \n"
            f"**seeds**: {SEEDS_RULE}")


def build_page(cfg: ServeConfig, models: Models):
    """The page: the form on the left, the grid, status and downloads on the right; its API is /sample."""
    import gradio as gr

    model_cfg = models.generator.config
    rows = model_cfg.grid[0]
    start = recommended_sampling(SamplingConfig(), resolve_model_dir(cfg.generator))  # the page opens at these
    with gr.Blocks(title="simvq sampler") as page:
        gr.Markdown(header(cfg, models))
        with gr.Row():
            with gr.Column(scale=1):
                condition = request_kind(model_cfg).page_input(gr, model_cfg)
                num_images = gr.Slider(1, cfg.max_images, value=min(8, cfg.max_images), step=1, label="images",
                                       elem_id="num_images")
                with gr.Row(visible=models.generator.condition.conditional):
                    guidance = gr.Slider(0, GUIDANCE_MAX, value=start.guidance_scale, step=0.1,
                                         label="guidance scale (1 = off)", elem_id="guidance")
                    schedule = gr.Radio(["constant", "linear"], value=start.guidance_schedule, label="guidance schedule")
                temperature = gr.Slider(0, TEMPERATURE_MAX, value=start.temperature, step=0.05,
                                        label="temperature (0 = argmax)")
                with gr.Row():
                    top_k = gr.Number(start.top_k, precision=0, label="top-k (0 = all)")
                    top_p = gr.Slider(0, 1, value=start.top_p, step=0.01, label="top-p (1 = all)")
                    seed = gr.Number(start.seed, precision=0, label="seed")
                with gr.Accordion("complete an image (its top code rows kept)", open=False):
                    prefix_image = gr.Image(type="filepath", sources=["upload"], label="image")
                    prefix_rows = gr.Slider(0, rows - 1, value=0, step=1, label=f"rows kept (of {rows})")
                button = gr.Button("sample", variant="primary")
            with gr.Column(scale=1):
                grid = gr.Image(label="grid.png", type="filepath", format="png", elem_id="grid", interactive=False,
                                height=GRID_HEIGHT)
                status = gr.Markdown(elem_id="status")
                files = gr.File(label="downloads", file_count="multiple", interactive=False)
        inputs = [condition, num_images, guidance, schedule, temperature, top_k, top_p, seed, prefix_image,
                  prefix_rows]
        button.click(lambda *values: answer(cfg, models, Request(*values)), inputs, [grid, status, files],
                     api_name="sample")
    return page


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch(cfg: ServeConfig):
    """Load the models, build the page and serve it from a thread; returns (page, its local URL) once it is up."""
    import gradio as gr

    check_serve(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    models = load_models(SampleConfig(generator=cfg.generator, tokenizer=cfg.tokenizer, device=cfg.device))
    if conditioning_for(models.generator.config).needs_text:  # loaded once, not per request
        models.text_encoder = generator_text_encoder(models.generator.config, models.device)
    page = build_page(cfg, models).queue(default_concurrency_limit=1, max_size=cfg.queue_size)
    port = cfg.port or free_port(cfg.host)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]note[/]: host={cfg.host}: the page is open to the network")
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    try:
        page.launch(server_name=cfg.host, server_port=port, share=False, prevent_thread_lock=True,
                    show_error=True, allowed_paths=[str(Path(cfg.out).resolve())], ssr_mode=False, theme=theme,
                    css=CSS, quiet=True)
    except OSError as err:
        raise UserError(f"cannot serve on {cfg.host}:{port} ({err}): pass another --port, or --port 0 for a free "
                        f"one") from None
    return page, page.local_url


def serve(cfg: ServeConfig) -> None:
    """`simvq serve`: the page until Ctrl+C."""
    page, url = launch(cfg)
    console.print(f"[green]serving[/] {cfg.generator} at {url} (Ctrl+C stops)")
    page.block_thread()
