"""Prompt providers for `upscale` and `sample`: none, a fixed text, a sidecar ``NAME.txt``, or the RAM tagger.

The released models were conditioned on RAM tags (with DAPE weights), comma-separated, nothing added. The
tagger is optional: it needs the user's own `ram` package (recognize-anything) and checkpoint files; nothing
here depends on it otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT_SOURCES = ("none", "text", "sidecar", "ram")

PromptFn = Callable[[Path, torch.Tensor], str]


def sidecar_prompt(image_path: Path) -> str:
    """The text of ``NAME.txt`` beside ``NAME.png``; empty (with a warning) when there is none."""
    txt = Path(image_path).with_suffix(".txt")
    if not txt.is_file():
        print(f"warning: no prompt file {txt}; using an empty prompt", file=sys.stderr)
        return ""
    return txt.read_text().strip()


# Buffers the RAM code rebuilds from the window size, dropped from a checkpoint before loading it.
RAM_REBUILT = ("relative_position_index", "attn_mask")


def tagger_state(path: Path) -> dict[str, torch.Tensor]:
    """A RAM / DAPE checkpoint's state dict renamed as the RAM code renames it before loading (the ``model``
    entry if any; ``vision_multi`` -> ``tagging_head``; the rebuilt buffers dropped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    return {
        k.replace("vision_multi", "tagging_head"): v
        for k, v in state.items()
        if not any(r in k for r in RAM_REBUILT)
    }


def load_tagger_weights(model: torch.nn.Module, paths: list[Path]) -> None:
    """Load the checkpoints ``paths`` into ``model`` in turn (a later one overrides an earlier one's keys).

    Strict over them together: a key of the model that none of them holds (other than the rebuilt buffers),
    or a key that the model lacks, is a ValueError naming the keys and files; nothing is loaded then.
    """
    merged: dict[str, torch.Tensor] = {}
    for path in paths:
        merged.update(tagger_state(path))
    own = set(model.state_dict())
    missing = sorted(k for k in own - set(merged) if not any(r in k for r in RAM_REBUILT))
    unexpected = sorted(set(merged) - own)
    if missing or unexpected:

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        problems = ([f"missing keys: {some(missing)}"] if missing else []) + (
            [f"unexpected keys: {some(unexpected)}"] if unexpected else []
        )
        raise ValueError(
            f"the RAM/DAPE checkpoints {', '.join(map(str, paths))} do not fit the tagger: {'; '.join(problems)}"
        )
    model.load_state_dict(merged, strict=False)  # only the rebuilt buffers are left as the model built them


def ram_tagger(ram_path: Path | None, dape_path: Path | None, device: str | torch.device) -> PromptFn:
    """RAM (swin-L, 384 px) tags with DAPE weights, as the released scripts used; needs the `ram` package.

    Checkpoints are read with ``torch.load(weights_only=True)`` (no pickled code is executed).
    """
    for label, p in (("--ram-path", ram_path), ("--dape-path", dape_path)):
        if p is None or not Path(p).is_file():
            raise FileNotFoundError(
                f"prompt source 'ram' needs {label} pointing to a checkpoint file (got {p})"
            )
    try:
        from ram import inference_ram
        from ram.models.ram_lora import ram
    except ImportError as exc:
        raise ValueError(
            "prompt source 'ram' needs the recognize-anything `ram` package (with DAPE's ram_lora), which is "
            "not installed; install it yourself or use --prompt-source none|text|sidecar"
        ) from exc
    model = ram(pretrained="", pretrained_condition="", image_size=384, vit="swin_l")
    load_tagger_weights(model, [Path(ram_path), Path(dape_path)])
    model = model.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def tag(image_path: Path, image: torch.Tensor) -> str:
        x = torch.nn.functional.interpolate(image.to(device), size=(384, 384), mode="bicubic").clamp(0, 1)
        tags = inference_ram((x - mean) / std, model)[0]
        return ", ".join(t.strip() for t in tags.split("|") if t.strip())

    return tag


def make_prompt_fn(
    source: str,
    text: str = "",
    ram_path: Path | None = None,
    dape_path: Path | None = None,
    device: str | torch.device = "cpu",
) -> PromptFn:
    """A function (image path, LR tensor in [0, 1]) -> prompt string, for ``source`` in PROMPT_SOURCES."""
    if source == "none":
        return lambda path, image: ""
    if source == "text":
        return lambda path, image: text
    if source == "sidecar":
        return lambda path, image: sidecar_prompt(path)
    if source == "ram":
        return ram_tagger(ram_path, dape_path, device)
    raise ValueError(f"prompt source must be one of {list(PROMPT_SOURCES)}, got {source!r}")
