"""Reproduce the embedded default SR model (``src/dp2osr/assets/embedded/``) end to end.

1. Photos (run once, on a machine with scikit-image and Debian's opencv-doc unpacked)::

       apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb /tmp/opencv-doc
       python scripts/train_embedded.py --export-photos PHOTOS --opencv-doc /tmp/opencv-doc

   writes the 6 photos bundled with scikit-image as PNG and copies 32 hand-picked colour photos (>= 256 px)
   from opencv-doc's examples (see ``OPENCV_PHOTOS``) byte for byte: 38 files, about 8 MB. With ``--debian DIR``
   (where ``mate-backgrounds`` and ``plasma-workspace-wallpapers`` were unpacked with ``dpkg-deb -x``) it adds
   their 23 photographs (``MATE_PHOTOS``, ``PLASMA_PHOTOS``; wallpapers shrunk to 1600 px): 61 photos. The
   folder's ``SOURCES.md`` lists every file's source package and licence.

2. Training (needs no scikit-image, pyiqa or network: torch, diffusers, numpy, pillow, pandas/pyarrow)::

       python scripts/train_embedded.py --photos PHOTOS --work WORK --out MODEL --minutes 5 --device cuda

   - the photos in ``HOLDOUT`` are never trained on (``research/eval_embedded.py`` evaluates on them);
   - ``--crops`` random HR crops (``--crop-size``, random scale in [0.5, 1], flips and 90° turns) of the others,
     each degraded to ×4 LR by ``dp2osr.degrade.degrade_image`` with ``MILD`` parameters (a milder version of
     Real-ESRGAN's second-order pipeline, the range of inputs `dp2osr upscale` meets in everyday photos),
     in parallel on all CPU cores -> ``WORK/data`` (a `dp2osr degrade`-style folder: hr/, lr/, pairs.parquet);
   - stage 0 (``--sharpener-minutes``, or ``--sharpener FILE`` trained earlier; ``--sharpener-only`` stops
     after it): the deterministic SR branch (``train_sharpener``, L1), which becomes the base image of the
     model's stand-in autoencoder, with the diffused residual reduced to brightness (``luma_only``) and scaled
     by ``--detail`` at decode (``with_sharpener``);
   - an untrained model from ``build_embedded(--seed)`` -> ``WORK/init`` (or ``--init FOLDER`` to go on
     training an existing model, e.g. the shipped one);
   - stage 1, the base model's pretraining (``pretrain_base``; ``--base-fraction`` of the time, or
     ``--base-steps``): the UNet and the ControlNet trained together, because the method's trainer only
     trains the ControlNet and this model has no pretrained base (see ``pretrain_base`` for the measurement);
   - stage 2, ``dp2osr train --mode sft`` (``dp2osr.train.run``, ControlNet only, EMA): a short calibration
     run on a small subset measures the speed, then one run of as many steps as fit the rest of ``--minutes``
     (or exactly ``--steps``) on ``--sft-crops`` of the crops;
   - the base plus the trained ControlNet (EMA weights) -> ``--out`` in fp16 (each file < 16 MB; 8 files),
     with ``train_log.json`` (the recipe and both loss curves).

GPU example (one H100/H200, ~5 minutes of training, ~7 minutes in all)::

    python scripts/train_embedded.py --photos PHOTOS --work /tmp/emb --out OUT --minutes 5 --crops 30000 \\
        --batch-size 128 --lr 4e-4 --sft-lr 1e-4 --warmup 200 --base-fraction 0.7 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from dp2osr.degrade import PAIRS_COLUMNS, DegradationParams, degrade_image, image_seed
from dp2osr.images import list_images, load_image, save_image, write_parquet
from dp2osr.math.degradations import PRESETS
from dp2osr.math.geometry import resize

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
# name -> path under usr/share/doc/opencv-doc/examples/ (Debian opencv-doc 4.6.0): colour photos >= 256 px;
# left out: logos, charts, masks, renderings, drawings and the second image of stereo/flow pairs.
OPENCV_PHOTOS = {
    "plant": "alphamat/input_images/plant.jpg",
    "aero1": "data/aero1.jpg",
    "aero3": "data/aero3.jpg",
    "aloeL": "data/aloeL.jpg",
    "apple": "data/apple.jpg",
    "baboon": "data/baboon.jpg",
    "board": "data/board.jpg",
    "building": "data/building.jpg",
    "butterfly": "data/butterfly.jpg",
    "chicky_512": "data/chicky_512.png",
    "ela_original": "data/ela_original.jpg",
    "fruits": "data/fruits.jpg",
    "graf1": "data/graf1.png",
    "home": "data/home.jpg",
    "left": "data/left.jpg",
    "leuvenA": "data/leuvenA.jpg",
    "licenseplate_motion": "data/licenseplate_motion.jpg",
    "messi5": "data/messi5.jpg",
    "orange": "data/orange.jpg",
    "rubberwhale1": "data/rubberwhale1.png",
    "squirrel_cls": "data/squirrel_cls.jpg",
    "starry_night": "data/starry_night.jpg",
    "stuff": "data/stuff.jpg",
    "monarch": "dnn_superres/butterfly.png",
    "house": "reg/home.png",
    "scenetext01": "text/scenetext01.jpg",
    "scenetext03": "text/scenetext03.jpg",
    "scenetext04": "text/scenetext04.jpg",
    "scenetext05": "text/scenetext05.jpg",
    "scenetext06": "text/scenetext06.jpg",
    "hotel": "text/scenetext_segmented_word01.jpg",
    "stationery": "text/scenetext_segmented_word02.jpg",
}
# Photos of Debian's mate-backgrounds (usr/share/backgrounds/mate/nature/, all 12) and plasma-workspace-wallpapers
# (usr/share/wallpapers/NAME/contents/images/, the largest file; only the photographs, not the renderings).
MATE_PHOTOS = (
    "Aqua",
    "Blinds",
    "Dune",
    "FreshFlower",
    "Garden",
    "GreenMeadow",
    "LadyBird",
    "RainDrops",
    "Storm",
    "TwoWings",
    "Wood",
    "YellowFlower",
)
PLASMA_PHOTOS = (
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
)
WALLPAPER_SIDE = 1600  # wallpapers (up to 5120 px) are shrunk to this long side: more detail per pixel
SOURCES = {
    "scikit-image": "scikit-image's bundled sample images (skimage.data; BSD-3-Clause / public domain, see its docs)",
    "opencv-doc": "Debian opencv-doc 4.6.0 examples (OpenCV: Apache-2.0; sample images as in its copyright file)",
    "mate-backgrounds": "Debian mate-backgrounds 1.26.0 (GPL-2+ per its copyright file)",
    "plasma-workspace-wallpapers": "Debian plasma-workspace-wallpapers 5.27.5 (KDE VDG, GPL-2+ per its copyright file)",
}
# Never trained on: the quickstart's four bundled photos (src/dp2osr/assets/photos) and six more.
HOLDOUT = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "baboon",
    "building",
    "fruits",
    "leuvenA",
    "scenetext04",
    "squirrel_cls",
)

# The degradations of the training crops: `dp2osr degrade`'s presets (``dp2osr.math.degradations``).
MILD = DegradationParams(**PRESETS["mild"])  # lighter blur, noise and JPEG than Real-ESRGAN x4plus
REALESRGAN = DegradationParams(**PRESETS["realesrgan"])  # `dp2osr degrade`'s defaults (Real-ESRGAN x4plus)
SCALE = 4
EVAL_HR = 256  # held-out HR crops: 256 px (ms_ssim needs >= 176), from the photo resized to short side 384
EVAL_SHORT_SIDE = 384


# --------------------------------------------------------------------------------------------- photos
def _wallpapers(root: Path, out: Path) -> list[tuple[Path, str]]:
    """Copy the mate-backgrounds photos and shrink the plasma wallpapers' largest files into ``out``."""
    from PIL import Image

    written = []
    mate = root / "usr/share/backgrounds/mate/nature"
    for name in MATE_PHOTOS if mate.is_dir() else ():
        shutil.copyfile(mate / f"{name}.jpg", out / f"{name}.jpg")
        written.append((out / f"{name}.jpg", "mate-backgrounds"))
    plasma = root / "usr/share/wallpapers"
    for name in PLASMA_PHOTOS if plasma.is_dir() else ():
        files = sorted(
            (plasma / name / "contents" / "images").iterdir(), key=lambda f: int(f.name.split("x")[0])
        )
        with Image.open(files[-1]) as im:
            im = im.convert("RGB")
            im.thumbnail((WALLPAPER_SIDE, WALLPAPER_SIDE), Image.Resampling.LANCZOS)
            im.save(out / f"{name}.png", optimize=True)
        written.append((out / f"{name}.png", "plasma-workspace-wallpapers"))
    return written


def export_photos(out: Path, opencv_doc: Path | None, debian: Path | None = None) -> list[Path]:
    """Write the scikit-image photos (PNG), copy the opencv-doc ones (unchanged bytes) and, with ``debian`` (a
    folder where mate-backgrounds / plasma-workspace-wallpapers were unpacked), their photos into ``out``;
    ``out/SOURCES.md`` lists every file's source package and licence."""
    import skimage.data  # only here: the training machine has no scikit-image
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SKIMAGE_PHOTOS:
        arr = getattr(skimage.data, name)()
        Image.fromarray(arr).convert("RGB").save(out / f"{name}.png", optimize=True)
        written.append(out / f"{name}.png")
    if opencv_doc is not None:
        root = Path(opencv_doc)
        for sub in ("usr/share/doc/opencv-doc/examples", "examples", "."):
            if (root / sub / "data" / "baboon.jpg").is_file():
                root = root / sub
                break
        else:
            raise FileNotFoundError(
                f"{opencv_doc}: no opencv-doc examples folder (dpkg-deb -x the .deb there)"
            )
        for name, rel in OPENCV_PHOTOS.items():
            dst = out / f"{name}{Path(rel).suffix}"
            shutil.copyfile(root / rel, dst)
            written.append(dst)
    sources = [(p, "scikit-image") for p in written[: len(SKIMAGE_PHOTOS)]]
    sources += [(p, "opencv-doc") for p in written[len(SKIMAGE_PHOTOS) :]]
    if debian is not None:
        sources += _wallpapers(Path(debian), out)
        written = [p for p, _ in sources]
    lines = ["# Training photos: sources and licences", ""] + [f"- {k}: {v}" for k, v in SOURCES.items()]
    lines += ["", "| file | source |", "|---|---|"] + [f"| {p.name} | {src} |" for p, src in sources]
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in written)
    print(f"{len(written)} photos, {total / 1e6:.1f} MB -> {out}")
    return written


def split_photos(photos: Path) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos) of a folder; held-out = the stems in ``HOLDOUT``."""
    files = list_images(photos)
    train = [p for p in files if p.stem not in HOLDOUT]
    held = [p for p in files if p.stem in HOLDOUT]
    if not train:
        raise ValueError(f"{photos}: no training photos (all {len(files)} are held out)")
    return train, held


# ---------------------------------------------------------------------------------------------- pairs
def _random_crop(photo: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A ``size``² crop of a region ``size / s`` wide (s ~ U(0.5, 1), shrunk with antialiasing), flipped/turned."""
    h, w = photo.shape[-2:]
    s = float(rng.uniform(max(0.5, size / min(h, w)), 1.0))
    side = min(round(size / s), h, w)
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    hr = resize(photo[..., top : top + side, left : left + side], (size, size))
    if rng.random() < 0.5:
        hr = hr.flip(-1)
    hr = torch.rot90(hr, int(rng.integers(4)), dims=(-2, -1))
    return (hr * 255).round() / 255  # an 8-bit image, as saved


def _make_crops(job: tuple[str, list[str], int, str, float]) -> list[tuple]:
    """Worker: all crops of one photo -> hr/ID.png, lr/ID.png; returns the pairs.parquet rows.

    Each crop is degraded with ``MILD`` or, with probability ``harsh``, with `dp2osr degrade`'s Real-ESRGAN
    x4plus defaults (the real camera LR of RealSR-like inputs lies between the two)."""
    path, ids, size, out, harsh = job
    torch.set_num_threads(1)
    photo, out = load_image(Path(path)), Path(out)
    rows = []
    for image_id in ids:
        seed = image_seed(0, image_id)
        rng = np.random.default_rng(seed)
        hr = _random_crop(photo, size, rng)
        params = REALESRGAN if rng.random() < harsh else MILD
        lr = degrade_image(hr, SCALE, params, torch.Generator().manual_seed(seed))
        save_image(hr, out / "hr" / f"{image_id}.png")
        save_image(lr, out / "lr" / f"{image_id}.png")
        rows.append((image_id, f"hr/{image_id}.png", f"lr/{image_id}.png", str(Path(path).resolve()), seed))
    return rows


def make_training_pairs(
    photos: list[Path], out: Path, n: int, size: int, seed: int = 0, harsh: float = 0.0
) -> Path:
    """``n`` HR crops spread over ``photos`` (in proportion to the square root of their areas) + their LR."""
    import pandas as pd
    from PIL import Image

    if size % SCALE:
        raise ValueError(f"--crop-size must be a multiple of {SCALE}, got {size}")
    if (out / "pairs.parquet").is_file() and len(pd.read_parquet(out / "pairs.parquet")) == n:
        print(f"training pairs: reusing {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    areas = []
    for p in photos:
        with Image.open(p) as im:
            areas.append(math.sqrt(im.size[0] * im.size[1]))
    counts = np.random.default_rng(seed).multinomial(n, np.asarray(areas) / sum(areas))
    jobs, k = [], 0
    for p, c in zip(photos, counts):
        ids = [f"{p.stem}_{seed}_{k + i:06d}" for i in range(c)]
        jobs += [
            (str(p), ids[i : i + 200], size, str(out), harsh) for i in range(0, c, 200)
        ]  # balanced workers
        k += c
    t0 = time.time()
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with mp.get_context("spawn").Pool(workers) as pool:
        rows = [r for part in pool.imap_unordered(_make_crops, jobs) for r in part]
    rows.sort()
    columns = [c for c in PAIRS_COLUMNS if c != "source_sha"]  # crops of many photos: no per-source hash
    table = pd.DataFrame(rows, columns=columns).astype({"seed": "int64"})
    write_parquet(table, out / "pairs.parquet")
    print(
        f"training pairs: {len(rows)} crops of {size} px from {len(photos)} photos in {time.time() - t0:.0f} s"
    )
    return out


def eval_pairs(photos: list[Path]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(id, HR, LR) of every held-out photo: the centre ``EVAL_HR``² of the photo at short side 384, degraded."""
    out = []
    for p in photos:
        img = load_image(p)
        h, w = img.shape[-2:]
        k = EVAL_SHORT_SIDE / min(h, w)
        img = resize(img, (round(h * k), round(w * k)))
        h, w = img.shape[-2:]
        top, left = (h - EVAL_HR) // 2, (w - EVAL_HR) // 2
        hr = (img[..., top : top + EVAL_HR, left : left + EVAL_HR] * 255).round() / 255
        lr = degrade_image(hr, SCALE, MILD, torch.Generator().manual_seed(image_seed(1, p.stem)))
        out.append((p.stem, hr, lr))
    return out


# ------------------------------------------------------------------------------------------- training
def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _seconds_per_step(run: Path) -> float:
    """Seconds per step over the second half of a run's log (after warm-up)."""
    lines = _log(run)
    if len(lines) < 2:
        return lines[-1]["seconds"] / max(1, lines[-1]["step"])
    a, b = lines[max(0, len(lines) // 2 - 1)], lines[-1]
    return (b["seconds"] - a["seconds"]) / max(1, b["step"] - a["step"])


def _load_seconds(init: Path, data: Path, device: str, n: int = 128) -> float:
    """Seconds to load and encode one training example (train does it once, into its frozen inputs)."""
    import pandas as pd

    from dp2osr.backbones import load_backbone
    from dp2osr.engine.train_data import FrozenEncoder

    bb = load_backbone("embedded", base=init).to(device)
    enc = FrozenEncoder(bb, SCALE)
    rows = pd.read_parquet(data / "pairs.parquet").head(n)
    t0 = time.perf_counter()
    for hr, lr in zip(rows.hr_path, rows.lr_path):
        up = enc.lr_up(str(data / lr))
        enc.latents(str(data / hr), str(data / lr), up)
        enc.control(up)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(rows)


def load_pairs(bb, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, control images) of every pair of a training folder, on the backbone's device."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    rows = pd.read_parquet(data / "pairs.parquet")

    def one(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        hr, lr = load_image(data / rows.hr_path.iloc[k]), load_image(data / rows.lr_path.iloc[k])
        return hr, resize(lr, tuple(hr.shape[-2:]))

    latents, controls = [], []
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for i in range(0, len(rows), 512):
            hr, up = (torch.cat(t) for t in zip(*pool.map(one, range(i, min(i + 512, len(rows))))))
            latents.append(bb.encode_images(hr, up.to(bb.device)).float())
            controls.append(up.to(bb.device))
    return torch.cat(latents), torch.cat(controls)


def train_sharpener(
    data: Path, args: argparse.Namespace, device: str, seconds: float | None, steps: int | None
) -> tuple[torch.nn.Module, dict]:
    """Stage 0: the deterministic SR branch (`dp2osr.backbones.embedded.Sharpener`), L1 to the HR.

    It turns the bicubic-upsampled LR into a sharper base image; the diffusion model (stages 1 and 2) then
    models only the residual over that base. AdamW with a cosine decay over the budget, EMA of the weights.
    """
    import pandas as pd

    from dp2osr.backbones.embedded import Sharpener

    rows = pd.read_parquet(data / "pairs.parquet")
    hr = torch.cat([load_image(data / r) for r in rows.hr_path])
    lr = torch.cat([load_image(data / r) for r in rows.lr_path])
    up = resize(lr, tuple(hr.shape[-2:]))
    net = Sharpener(SCALE, args.sharpener_channels, args.sharpener_blocks).to(device).train()
    ema = Sharpener(SCALE, args.sharpener_channels, args.sharpener_blocks).to(device)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=args.sharpener_lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 3)
    total = steps or 10**9
    step, log, start = 0, [], time.time()
    while step < total and (seconds is None or time.time() - start < seconds):
        frac = step / total if steps else (time.time() - start) / seconds
        for group in opt.param_groups:
            group["lr"] = args.sharpener_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        idx = torch.randint(0, len(hr), (args.batch_size,), generator=g)
        loss = (net(up[idx].to(device)) - hr[idx].to(device)).abs().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, q in zip(ema.parameters(), net.parameters()):
                e.lerp_(q, 1 - args.ema_decay)
        step += 1
        if step % 10 == 0:
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 2)})
        if step % 500 == 0:
            print(f"sharpener: step {step}, L1 {loss.item():.4f}, {time.time() - start:.0f} s", flush=True)
    with torch.no_grad():
        bicubic_l1 = (up - hr).abs().mean().item()
    print(f"sharpener: {step} steps in {time.time() - start:.0f} s (bicubic L1 {bicubic_l1:.4f})", flush=True)
    ema.requires_grad_(False).eval().to("cpu")
    return ema, {
        "steps": step,
        "seconds": round(time.time() - start, 1),
        "bicubic_l1": bicubic_l1,
        "loss_curve": log,
    }


def with_sharpener(init: Path, sharpener: torch.nn.Module, out: Path, detail: float) -> Path:
    """The model in ``init`` with the stage-0 sharpener as the base of its autoencoder, luma-only residual."""
    from dp2osr.backbones import load_backbone
    from dp2osr.backbones.embedded import ResidualSpaceToDepth

    bb = load_backbone("embedded", base=init)
    bb.vae = ResidualSpaceToDepth(bb.vae.factor, bb.vae.scale, sharpener, luma_only=True, detail=detail)
    shutil.rmtree(out, ignore_errors=True)
    bb.save_pretrained(out)
    return out


def pretrain_base(
    init: Path,
    data: Path,
    out: Path,
    args: argparse.Namespace,
    device: str,
    seconds: float | None,
    steps: int | None,
) -> dict:
    """Stage 1, the base model's pretraining: the UNet *and* the ControlNet trained together.

    ``dp2osr train`` trains only the ControlNet, as the method prescribes for SD2/FLUX, whose UNet/transformer
    comes pretrained. The embedded model has no pretrained base, and a ControlNet steering a random frozen
    UNet learns slowly (CPU test, 64² crops, batch 16: validation v-loss 0.472 after 200 steps / 300 s of
    ControlNet-only training vs 0.382 after 100 steps / 230 s of joint training; 0.575 at the start). So this
    stage trains both with the same loss as ``dp2osr train --mode sft`` (``noisy_and_target``, ``predict``,
    ``mse_per_sample``; AdamW, warm-up, gradient clipping, EMA), stops after ``steps`` or ``seconds``, and writes
    a complete model folder (the EMA weights) that stage 2 starts from.
    """
    from dp2osr.backbones import load_backbone
    from dp2osr.math.loss import mse_per_sample

    t0 = time.time()
    bb = load_backbone("embedded", base=init).to(device)
    latents, controls = load_pairs(bb, data)
    n = latents.shape[0]
    print(f"base pretraining: {n} pairs loaded in {time.time() - t0:.0f} s", flush=True)
    nets = [bb.unet, bb.controlnet]
    for net in nets:
        net.requires_grad_(True).train()
    params = [p for net in nets for p in net.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, args.warmup)))
    g = torch.Generator().manual_seed(args.seed + 1)
    gd = torch.Generator(device).manual_seed(args.seed + 2)
    cond = bb.encode_prompts([""] * args.batch_size)
    cuda = device.startswith("cuda")
    step, log, start = 0, [], time.time()
    while (steps is None or step < steps) and (seconds is None or time.time() - start < seconds):
        idx = torch.randint(0, n, (args.batch_size,), generator=g).to(device)
        x0, control = latents[idx], controls[idx]
        noise = torch.randn(x0.shape, generator=gd, device=device)
        t = bb.sample_timesteps(args.batch_size, tuple(x0.shape[-2:]), g)
        noisy, target = bb.noisy_and_target(x0, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            pred = bb.predict(noisy, t, cond, control)
        loss = mse_per_sample(pred.float(), target.float()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - args.ema_decay)
        step += 1
        if step % 10 == 0:
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 2)})
        if step % 500 == 0:
            print(
                f"base pretraining: step {step}, loss {loss.item():.4f}, {time.time() - start:.0f} s",
                flush=True,
            )
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for net in nets:
        net.requires_grad_(False).eval()
    shutil.rmtree(out, ignore_errors=True)
    bb.to("cpu").save_pretrained(out)
    seconds_used = time.time() - start
    print(f"base pretraining: {step} steps in {seconds_used:.0f} s -> {out}", flush=True)
    return {"steps": step, "seconds": round(seconds_used, 1), "loss_curve": log}


def export_model(init: Path, controlnet: Path, out: Path, dtype: str = "fp16") -> None:
    """The base in ``init`` plus a trained ControlNet folder -> a complete model folder in ``dtype``."""
    from dp2osr.backbones import load_backbone

    bb = load_backbone("embedded", base=init, controlnet=controlnet, dtype=dtype)
    shutil.rmtree(out, ignore_errors=True)
    bb.save_pretrained(out)
    for f in out.rglob("*"):
        if f.is_file() and f.stat().st_size > 16e6:
            print(f"warning: {f} is {f.stat().st_size / 1e6:.1f} MB (> 16 MB)", file=sys.stderr)
    print(f"model -> {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


def train_model(args: argparse.Namespace) -> Path:
    import pandas as pd
    from safetensors.torch import load_file, save_file

    from dp2osr.backbones.embedded import Sharpener, build_embedded
    from dp2osr.train import TrainConfig
    from dp2osr.train import run as train

    work, out = Path(args.work), Path(args.out)
    train_photos, held = split_photos(Path(args.photos))
    print(
        f"photos: {len(train_photos)} for training, {len(held)} held out ({', '.join(p.stem for p in held)})"
    )
    data = make_training_pairs(train_photos, work / "data", args.crops, args.crop_size, args.seed, args.harsh)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    init = Path(args.init) if args.init is not None else work / "init"
    if args.init is None:
        build_embedded(args.seed, tuple(args.widths), args.residual_scale).save_pretrained(init)
    stage0 = None
    if args.sharpener is not None:  # a sharpener trained earlier (its safetensors file)
        sharpener = Sharpener(SCALE, args.sharpener_channels, args.sharpener_blocks)
        sharpener.load_state_dict(load_file(str(args.sharpener)))
        init = with_sharpener(init, sharpener.eval(), work / "init_sharpener", args.detail)
    elif args.sharpener_steps or args.sharpener_minutes:
        seconds = args.sharpener_minutes * 60 if args.sharpener_minutes else None
        sharpener, stage0 = train_sharpener(data, args, device, seconds, args.sharpener_steps)
        save_file(
            {k: v.contiguous() for k, v in sharpener.state_dict().items()},
            str(work / "sharpener.safetensors"),
        )
        if args.sharpener_only:
            print(f"sharpener -> {work / 'sharpener.safetensors'}")
            return work / "sharpener.safetensors"
        init = with_sharpener(init, sharpener, work / "init_sharpener", args.detail)
    stage1 = None
    if args.base_steps or (args.base_steps is None and args.base_fraction > 0):
        budget = None if args.base_steps is not None else args.minutes * 60 * args.base_fraction
        stage1 = pretrain_base(init, data, work / "base", args, device, budget, args.base_steps)
        init = work / "base"

    def config(steps: int, data: Path, output: Path) -> TrainConfig:
        shutil.rmtree(output, ignore_errors=True)
        return TrainConfig(
            mode="sft",
            backbone="embedded",
            base=init,
            data=data,
            output=output,
            device=device,
            steps=steps,
            lr=args.sft_lr,
            warmup_steps=min(args.warmup, steps // 2),
            batch_size=args.batch_size,
            prompt_dropout=0.0,  # the prompt is a constant: nothing to drop
            ema_decay=args.ema_decay,
            mixed_precision="bf16" if device.startswith("cuda") else "no",
            seed=args.seed,
            checkpoint_every=10**9,  # only at the end
            keep_checkpoints=1,
            log_every=10,
        )

    def subset(n: int, folder: Path) -> Path:
        """``n`` pairs drawn at random (seeded; every photo) as a table of their own, with absolute paths."""
        pairs = pd.read_parquet(data / "pairs.parquet")
        pairs = pairs.sample(n=min(n, len(pairs)), random_state=args.seed).sort_values("image_id")
        for col in ("hr_path", "lr_path"):
            pairs[col] = [str((data / p).resolve()) for p in pairs[col]]
        write_parquet(pairs, folder / "pairs.parquet")
        return folder

    sft_data = subset(args.sft_crops, work / "sft_data") if args.sft_crops else data
    steps = args.steps
    if steps is None:  # measure the speed on a small subset, then size the real run to the budget
        calib = work / "calibration"
        train(config(args.calibration_steps, subset(2 * args.batch_size, calib / "data"), calib / "run"))
        per_step = _seconds_per_step(calib / "run")
        per_example = _load_seconds(init, data, device)
        n_examples = len(pd.read_parquet(sft_data / "pairs.parquet"))
        left = args.minutes * 60 - (time.time() - t0) - n_examples * per_example - 20  # 20 s: start, save
        steps = max(args.calibration_steps, int(left / per_step))
        print(
            f"calibration: {per_step * 1000:.1f} ms/step, {per_example * 1000:.2f} ms to load an example "
            f"({n_examples} examples) -> {steps} steps",
            flush=True,
        )
    run = work / "run"
    train(config(steps, sft_data, run))  # raises TrainingDiverged
    log = _log(run)
    print(f"trained {steps} steps in {time.time() - t0:.0f} s ({_seconds_per_step(run) * 1000:.1f} ms/step)")
    export_model(init, run / "final" / "controlnet", out, args.save_dtype)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recipe.update(
        steps=steps,
        seconds=round(time.time() - t0, 1),
        device=device,
        degradation=f"MILD, or with probability {args.harsh} Real-ESRGAN x4plus (scripts/train_embedded.py)",
        holdout=list(HOLDOUT),
    )
    every = max(1, len(log) // 300)  # loss curves of at most ~300 points
    result = {
        "recipe": recipe,
        "sft_loss_curve": [{k: r[k] for k in ("step", "loss", "seconds") if k in r} for r in log[::every]],
    }
    if stage0 is not None:
        curve = stage0.pop("loss_curve")
        result["sharpener"] = {**stage0, "loss_curve": curve[:: max(1, len(curve) // 300)]}
    if stage1 is not None:
        curve = stage1.pop("loss_curve")
        result["base_pretraining"] = {**stage1, "loss_curve": curve[:: max(1, len(curve) // 300)]}
    (out / "train_log.json").write_text(json.dumps(result, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-photos", type=Path, help="write the photo folder (needs scikit-image) and exit")
    p.add_argument("--opencv-doc", type=Path, help="with --export-photos: the unpacked opencv-doc package")
    p.add_argument(
        "--debian",
        type=Path,
        help="with --export-photos: a folder where mate-backgrounds and "
        "plasma-workspace-wallpapers were unpacked (dpkg-deb -x)",
    )
    p.add_argument("--photos", type=Path, help="photo folder (from --export-photos)")
    p.add_argument("--work", type=Path, help="working folder (training pairs, untrained model, run)")
    p.add_argument("--out", type=Path, help="output model folder")
    p.add_argument("--init", type=Path, help="start from this embedded model folder instead of a new one")
    p.add_argument(
        "--minutes", type=float, default=5.0, help="training time budget of both stages (default 5)"
    )
    p.add_argument(
        "--base-fraction",
        type=float,
        default=0.6,
        help="share of --minutes for stage 1, the base pretraining (UNet + ControlNet); 0 = none: "
        "only `dp2osr train` trains, the ControlNet over the random UNet",
    )
    p.add_argument("--base-steps", type=int, help="stage 1: exactly this many steps (0 = skip stage 1)")
    p.add_argument("--steps", type=int, help="stage 2 (`dp2osr train --mode sft`): exactly this many steps")
    p.add_argument("--calibration-steps", type=int, default=40, help="steps of the speed measurement")
    p.add_argument("--crops", type=int, default=4000, help="number of training crops")
    p.add_argument("--crop-size", type=int, default=64, help="HR crop side (pixels, multiple of 4)")
    p.add_argument(
        "--sft-crops",
        type=int,
        default=8000,
        help="stage 2 trains on N of the crops, drawn at random (`dp2osr train` encodes each one on "
        "first use, which costs time at GPU speed); 0 = all",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4, help="stage 1 learning rate")
    p.add_argument("--sft-lr", type=float, default=1e-4, help="stage 2 (`dp2osr train`) learning rate")
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--widths", type=int, nargs="+", default=[64, 96, 128], help="UNet block widths of a new model"
    )
    p.add_argument(
        "--residual-scale", type=float, default=10.0, help="latent = scale x (HR - bicubic LR), new model"
    )
    p.add_argument(
        "--harsh",
        type=float,
        default=0.0,
        help="fraction of crops degraded with Real-ESRGAN x4plus instead of MILD",
    )
    p.add_argument(
        "--sharpener-minutes",
        type=float,
        default=0.0,
        help="stage 0: train the deterministic SR branch for this long (0 = no sharpener)",
    )
    p.add_argument("--sharpener-steps", type=int, help="stage 0: exactly this many steps")
    p.add_argument("--sharpener", type=Path, help="skip stage 0: use this trained sharpener (safetensors)")
    p.add_argument(
        "--sharpener-only", action="store_true", help="stop after stage 0 (WORK/sharpener.safetensors)"
    )
    p.add_argument("--sharpener-channels", type=int, default=48)
    p.add_argument("--sharpener-blocks", type=int, default=6)
    p.add_argument("--sharpener-lr", type=float, default=1e-3)
    p.add_argument("--detail", type=float, default=1.0, help="decode's scale of the generated residual")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--save-dtype", default="fp16", choices=["fp16", "fp32"], help="dtype of the saved weights"
    )
    args = p.parse_args(argv)
    if args.export_photos is not None:
        export_photos(args.export_photos, args.opencv_doc, args.debian)
        return 0
    for name in ("photos", "work", "out"):
        if getattr(args, name) is None:
            p.error(f"--{name} is required for training")
    train_model(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
