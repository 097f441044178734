"""`dp2osr demo`: a local web page to try a model on one photo — every sample, the best-of-M choice with its
scores, and a before/after slider.

It sits at the stage layer beside `pipeline.py`, on which it is built: the page's model is an `SRPipeline`
(loaded once per model), a request is one pipeline call with ``select="nr"`` (the pixels and choice of
`dp2osr upscale --select nr`), and the size guard is upscale's (`engine.budget`: the same estimate and
``--max-pixels`` refusal, before any work). `Demo` holds that logic without gradio; the page itself (gradio,
the ``demo`` extra) is built in `build_page`, importing gradio only when it is called, so the package imports
without it. The gradio queue runs one request at a time: the model is not shared between concurrent calls.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd
from PIL import Image

from dp2osr.config import check_choices, check_range, field
from dp2osr.engine.budget import DEFAULT_MAX_PIXELS, check_size, estimate, image_hw, plan_options
from dp2osr.engine.options import MAX_STEPS, ModelOptions
from dp2osr.images import load_image, to_pil
from dp2osr.math.colorfix import COLOR_FIXES

MISSING_GRADIO = 'the web demo needs gradio: pip install "dp2osr[demo]"'
EMBEDDED_LABEL = "embedded (shipped in the package)"


@dataclass(kw_only=True)
class DemoConfig(ModelOptions):
    """Serve a web page on this machine to try a model on a photo: upload it, choose the model, samples, seed
    and colour fix; see every sample, the one best-of-M picks (no-reference IQA, as `upscale --select nr`)
    with its scores, and a before/after slider.

    Quick use:  pip install "dp2osr[demo]";  dp2osr demo   -> open http://127.0.0.1:7860
    With the published model as a second choice beside the embedded one:
      dp2osr demo --backbone sd2 --base models/stable-diffusion-2-base --controlnet models/dp2o-sd2/model.safetensors
    One request runs at a time. The page listens on 127.0.0.1 (this machine only) unless --host says otherwise.
    """

    host: str = field(
        "127.0.0.1",
        help="address to listen on: 127.0.0.1 = this machine only; 0.0.0.0 = every network interface (anyone "
        "who reaches this machine can run the model)",
        run_only=True,
    )
    port: int = field(7860, help="port to listen on (0: a free one)", run_only=True)
    max_pixels: int = field(
        DEFAULT_MAX_PIXELS,
        help="refuse a photo whose output has more pixels than this (default 4096x4096), before any work, with "
        "its estimated memory and time; 0 = no limit",
        run_only=True,
    )
    samples: int = field(4, help="samples (M) preset on the page")
    max_samples: int = field(8, help="most samples a request may ask for")
    steps: int | None = field(None, help="denoising steps (default: the backbone's)")
    process_size: int | None = field(
        None, help="short side the model works at (default: the backbone's); photos above twice it are tiled"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check_range("port", self.port, 0, 65535, integer=True)
        check_range("max_samples", self.max_samples, 1, 64, integer=True)
        check_range("samples", self.samples, 1, self.max_samples, integer=True)
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")
        if self.steps is not None:
            check_range("steps", self.steps, 1, MAX_STEPS, integer=True)
        if self.process_size is not None and self.process_size < 16:
            raise ValueError(f"--process-size must be >= 16, got {self.process_size}")


@dataclass
class Result:
    """One request's answer: every sample with its caption, the chosen one beside the input upsized to its
    size (bicubic), the per-seed scores and a line on the estimate and time taken."""

    gallery: list[tuple[Image.Image, str]]
    before: Image.Image
    chosen: Image.Image
    scores: pd.DataFrame
    summary: str


class Demo:
    """The page's logic without gradio: the models it offers (loaded on first use, kept) and a request."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        model = {f.name: getattr(cfg, f.name) for f in fields(ModelOptions)}
        embedded = {**model, **{k: getattr(ModelOptions(), k) for k in ("backbone", "base", "controlnet")}}
        self.models = {model_label(cfg): model}
        if embedded != model:
            self.models[EMBEDDED_LABEL] = embedded
        self._loaded: dict = {}

    def pipeline(self, label: str):
        """The `SRPipeline` of the model ``label`` names (one of ``self.models``), loaded once."""
        if label not in self.models:
            raise ValueError(f"model must be one of {list(self.models)}, got {label!r}")
        if label not in self._loaded:
            from dp2osr.pipeline import SRPipeline

            opts = self.models[label]
            self._loaded[label] = SRPipeline.from_pretrained(
                opts["backbone"], opts["base"], opts["controlnet"], dtype=opts["dtype"], device=opts["device"]
            )
        return self._loaded[label]

    def check(self, path: Path, label: str, samples: int, seed: int, color_fix: str):
        """The call's `UpscaleConfig` and the photo's estimate; ValueError (before any work) for bad options or
        a photo above ``--max-pixels``, naming the photo, with the estimate `upscale` gives."""
        check_range("samples", samples, 1, self.cfg.max_samples, integer=True)
        pipe = self.pipeline(label)
        cfg = pipe.config(
            samples=int(samples),
            seed=int(seed),
            color_fix=color_fix,
            select="nr",
            steps=self.cfg.steps,
            process_size=self.cfg.process_size,
        )
        hw = image_hw(path)
        if hw is None:
            raise ValueError(f"{path.name}: not an image this demo can read (png, jpg, bmp, tif, webp)")
        est = estimate(hw, **plan_options(cfg, cpu=pipe.device.type == "cpu"))
        check_size(path.name, est, self.cfg.max_pixels)
        return pipe, cfg, est

    def run(self, path: str | Path, label: str, samples: int, seed: int, color_fix: str) -> Result:
        """Super-resolve the photo at ``path``: ``samples`` seeds from ``seed``, best-of-M by no-reference IQA."""
        path = Path(path)
        pipe, cfg, est = self.check(path, label, samples, seed, color_fix)
        start = time.perf_counter()
        out = pipe(
            path,
            samples=cfg.samples,
            seed=cfg.seed,
            color_fix=cfg.color_fix,
            select="nr",
            steps=cfg.steps,
            process_size=cfg.process_size,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        scores, chosen = out.scores[0], out.images[0]
        gallery = [
            (image, f"seed {int(row.seed)} · reward {row.reward:.3f}" + (" · chosen" if row.chosen else ""))
            for image, row in zip(out.samples[0], scores.itertuples())
        ]
        before = to_pil(load_image(path)).resize(chosen.size, Image.BICUBIC)
        metrics = ", ".join(c for c in scores.columns if c not in ("seed", "reward", "chosen"))
        summary = (
            f"{cfg.samples} sample(s) in {seconds:.1f} s on {pipe.device}; chosen: seed {out.seeds[0]} "
            f"(highest reward: {metrics}, min-max normalised over the samples). Estimate: {est.describe()}."
        )
        return Result(gallery, before, chosen, scores.round(4), summary)


def model_label(opts) -> str:
    """How the page names the model ``opts`` (backbone, base, ControlNet) describes."""
    if all(getattr(opts, k) == getattr(ModelOptions(), k) for k in ("backbone", "base", "controlnet")):
        return EMBEDDED_LABEL
    parts = [str(p) for p in (opts.base, opts.controlnet) if p is not None]
    return f"{opts.backbone}: {' + '.join(parts)}" if parts else str(opts.backbone)


def import_gradio():
    """gradio, or a one-line ValueError saying how to install it (it is the optional ``demo`` extra)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page sends nothing anywhere
    try:
        import gradio
    except ImportError:
        raise ValueError(MISSING_GRADIO) from None
    return gradio


def build_page(demo: Demo):
    """The gradio page of ``demo`` (a ``gradio.Blocks``), its queue running one request at a time."""
    gr = import_gradio()
    labels = list(demo.models)
    with gr.Blocks(title="dp2osr demo", analytics_enabled=False) as page:
        gr.Markdown(
            "## dp2osr — DP²O-SR super-resolution\nUpload a low-resolution photo (it is upscaled x4)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.Image(type="filepath", label="Photo", sources=["upload", "clipboard"])
                model = gr.Dropdown(labels, value=labels[0], label="Model")
                samples = gr.Slider(
                    1, demo.cfg.max_samples, value=demo.cfg.samples, step=1, label="Samples (M)"
                )
                seed = gr.Number(0, precision=0, minimum=0, label="Seed of the first sample")
                color_fix = gr.Dropdown(list(COLOR_FIXES), value="adain", label="Colour fix")
                go = gr.Button("Upscale", variant="primary", elem_id="upscale")
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="summary")
                slider = gr.ImageSlider(label="Before / after (the chosen sample)", type="pil", format="png")
                gallery = gr.Gallery(label="Every sample", columns=4, format="png", elem_id="samples")
                scores = gr.Dataframe(label="Scores per seed (the chosen one has the highest reward)")

        def respond(path, label, m, s, fix):
            if not path:
                raise gr.Error("Upload a photo first.")
            try:
                res = demo.run(path, label, int(m), int(s), fix)
            except ValueError as exc:
                # the message names the uploaded file: escaped, the page may render it as HTML
                raise gr.Error(html.escape(str(exc)), duration=None, print_exception=False) from None
            return res.summary, (res.before, res.chosen), res.gallery, res.scores

        inputs = [photo, model, samples, seed, color_fix]
        go.click(respond, inputs, [summary, slider, gallery, scores], concurrency_limit=1)
    return page.queue(default_concurrency_limit=1)


def launch(page, cfg: DemoConfig, block: bool = True):
    """Serve ``page`` on ``cfg.host``:``cfg.port``; returns its URL when ``block`` is False."""
    gr = import_gradio()
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.launch(
        server_name=cfg.host,
        server_port=cfg.port or None,
        prevent_thread_lock=not block,
        show_error=True,
        theme=theme,  # system fonts: the default theme would fetch web fonts from the internet
        footer_links=[],
    )
    return page.local_url


def run(cfg: DemoConfig) -> None:
    """Load the first model (so a wrong path fails before the page opens) and serve the page until stopped."""
    import_gradio()
    demo = Demo(cfg)
    demo.pipeline(next(iter(demo.models)))
    launch(build_page(demo), cfg)
