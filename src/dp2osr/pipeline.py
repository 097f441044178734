"""The Python API: `SRPipeline`, the `upscale` stage as an object that loads a model once and turns images in
memory (PIL images, numpy arrays) or image files into SR images, with best-of-M selection.

    from dp2osr import SRPipeline
    pipe = SRPipeline.from_pretrained()               # the embedded model; or backbone=, base=, controlnet=
    out = pipe("photo.png", samples=4, select="nr")   # out.images[0]: the chosen PIL image, out.scores[0]

It sits at the stage layer beside `upscale`, and is that stage without files: the same options
(`UpscaleConfig`'s fields, checked the same way), the same sampling calls (`engine.jobs.prepare_lr`,
`engine.jobs.sample_job`, with the same seed chunks) and the same choice (`upscale.choose` over the 8-bit
images), so an (image, seed) gives the pixels `dp2osr upscale` writes. The stages' own ``run(Config(...))``
functions are the programmatic form of the rest of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dp2osr import metrics as metric_lib
from dp2osr.backbones import DTYPES, Backbone, auto_dtype
from dp2osr.engine.jobs import chunk_jobs, prepare_lr, sample_job
from dp2osr.engine.options import FAST_PATHS, ModelOptions, load_model, sampling_settings
from dp2osr.images import load_image, to_pil, to_tensor
from dp2osr.prompts import make_prompt_fn
from dp2osr.runtime import resolve_device
from dp2osr.upscale import UpscaleConfig, choose, score_images, select_metric_names

# UpscaleConfig fields that a call does not take: the model is the pipeline's, and nothing is written.
NOT_CALL_OPTIONS = (
    {f.name for f in fields(ModelOptions)}
    | set(FAST_PATHS)
    | {
        "input",
        "output",
        "overwrite",
        "layout",
        "max_pixels",
    }
)


@dataclass
class SROutput:
    """What a call returns. ``images``: per input image, the chosen sample when selecting, else every sample
    (seed order), input after input. ``scores``: per input image when selecting, one row per seed (the raw
    metric values, ``reward``, ``chosen``), else None. ``seeds``: the seed of each entry of ``images``.
    ``samples``: per input image when selecting, every sample (seed order, as ``scores``' rows), else None."""

    images: list[Image.Image]
    seeds: list[int]
    scores: list[pd.DataFrame] | None = None
    samples: list[list[Image.Image]] | None = None


class SRPipeline:
    """A loaded SR model, called on images: ``SRPipeline.from_pretrained(...).to("cuda")(image).images``."""

    def __init__(self, backbone: Backbone, options: ModelOptions):
        self.backbone = backbone
        self.options = options
        self._metrics: dict[str, torch.nn.Module] = {}

    @classmethod
    def from_pretrained(
        cls,
        backbone: str = "embedded",
        base: str | Path | None = None,
        controlnet: str | Path | None = None,
        dtype: str = "auto",
        device: str = "auto",
        **fast_paths: bool,
    ) -> SRPipeline:
        """Load the model as `dp2osr upscale` does: ``backbone``, ``base`` and ``controlnet`` as its options of
        those names take them (local paths, or Hugging Face ids found in the local cache), ``dtype`` auto | fp32 |
        fp16 | bf16, ``device`` auto | cpu | cuda[:N]; ``channels_last``, ``fuse_qkv``, ``compile``: the
        sampling fast paths."""
        unknown = sorted(set(fast_paths) - set(FAST_PATHS))
        if unknown:
            raise ValueError(
                f"unknown options {unknown}; from_pretrained takes {list(FAST_PATHS)} besides the model"
            )
        opts = UpscaleConfig(
            input=Path("."),
            backbone=backbone,
            base=None if base is None else Path(base),
            controlnet=None if controlnet is None else Path(controlnet),
            dtype=dtype,
            device=device,
            **fast_paths,
        )
        return cls(load_model(opts, resolve_device(device)), opts)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def to(self, device: str | torch.device, dtype: str | None = None) -> SRPipeline:
        """Move the model to ``device`` (in ``dtype``; default: the dtype the pipeline was loaded with, ``auto``
        resolved for the new device as `upscale --device` would)."""
        device = resolve_device(str(device))
        name = dtype or self.options.dtype
        resolved = auto_dtype(self.options.backbone, device) if name == "auto" else name
        if resolved not in DTYPES:
            raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
        self.backbone.to(device, DTYPES[resolved])
        self._metrics = {}  # IQA models are built again on the new device when selecting
        return self

    def config(self, **options) -> UpscaleConfig:
        """The `UpscaleConfig` of a call with ``options`` (checked as the CLI checks them)."""
        bad = sorted(set(options) & NOT_CALL_OPTIONS)
        if bad:
            raise ValueError(f"{bad} cannot be given per call: the model is chosen in from_pretrained")
        if options.get("select") is None:
            options["select"] = "none"
        model = {f.name: getattr(self.options, f.name) for f in fields(ModelOptions)}
        fast = {k: getattr(self.options, k) for k in FAST_PATHS}
        return UpscaleConfig(input=Path("."), **model, **fast, **options)

    def __call__(
        self,
        images,
        *,
        samples: int = 1,
        seed: int = 0,
        color_fix: str = "adain",
        select: str | None = None,
        upscale: int = 4,
        steps: int | None = None,
        guidance: float | None = None,
        show_progress: bool = True,
        **options,
    ) -> SROutput:
        """Super-resolve ``images``: one image or a list of them, each a PIL image, a numpy array (HxW or HxWx3,
        uint8 or float in [0, 1]) or an image file's path. Sample k of an image uses seed ``seed + k``;
        ``select="nr"`` picks each image's best sample by no-reference IQA (``select_metrics``), as
        `upscale --select nr` does. Further keyword arguments are `dp2osr upscale`'s sampling options
        (``prompt``, ``prompt_source``, ``process_size``, ``batch_size``, ``select_metrics``, ...)."""
        cfg = self.config(
            samples=samples,
            seed=seed,
            color_fix=color_fix,
            select=select,
            upscale=upscale,
            steps=steps,
            guidance=guidance,
            **options,
        )
        inputs = list(images) if isinstance(images, (list, tuple)) else [images]
        seeds = [cfg.seed + k for k in range(cfg.samples)]
        selecting = cfg.select == "nr"
        out = SROutput(
            images=[], seeds=[], scores=[] if selecting else None, samples=[] if selecting else None
        )
        for i, image in enumerate(inputs):
            samples_i = self._sample(cfg, image, f"image_{i}", seeds, show_progress)
            if cfg.select != "nr":
                out.images += [to_pil(x) for x in samples_i]
                out.seeds += seeds
                continue
            table = self._select(cfg, samples_i, seeds)
            best = int(table.loc[table["chosen"], "seed"].iloc[0])
            out.images.append(to_pil(samples_i[seeds.index(best)]))
            out.seeds.append(best)
            out.scores.append(table)
            out.samples.append([to_pil(x) for x in samples_i])
        return out

    def _sample(self, cfg: UpscaleConfig, image, name: str, seeds: list[int], show: bool) -> torch.Tensor:
        """Every seed's sample of one input, ``(len(seeds), 3, H, W)``, in `dp2osr upscale`'s seed chunks."""
        if isinstance(image, (str, Path)):
            source, lr = Path(image), load_image(Path(image))
            name = source.stem
        else:
            source, lr = Path(name), to_tensor(image)
            if cfg.prompt_source == "sidecar":
                raise ValueError("prompt_source='sidecar' reads NAME.txt beside an image file: pass a path")
        bb, settings = self.backbone, sampling_settings(self.backbone, cfg)
        prompt_fn = make_prompt_fn(cfg.prompt_source, cfg.prompt, cfg.ram_path, cfg.dape_path, bb.device)
        cache = prepare_lr(bb, name, lr, source, cfg.upscale, prompt_fn, settings["negative_prompt"])
        jobs = chunk_jobs([(name, source)], seeds, cfg.batch_size)
        return torch.cat([sample_job(bb, job, cache, settings, cfg, show) for job in jobs])

    def _select(self, cfg: UpscaleConfig, samples: torch.Tensor, seeds: list[int]) -> pd.DataFrame:
        """`upscale.choose` over the samples as their PNGs read back (8-bit), with the metrics built once."""
        names = select_metric_names(cfg, min(samples.shape[-2:]))
        for name in names:
            if name not in self._metrics:
                self._metrics[name] = metric_lib.create(name, self.device, cfg.weights_dir)
        as_written = {s: to_tensor(np.asarray(to_pil(x))) for s, x in zip(seeds, samples)}
        return choose(score_images(as_written, names, self._metrics))
