"""The frozen training inputs on disk (engine/frozen_store.py): the same batches and DPO losses as encoding every
step, sharded building, 8-bit LR controls, reuse and rebuild by fingerprint."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dp2osr.backbones import load_backbone
from dp2osr.engine import frozen_store
from dp2osr.engine.objectives import dpo_objective, noise_batch, sft_objective
from dp2osr.engine.train_data import FrozenEncoder, OnTheFly, read_examples


class OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def _png(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3 LR images (two sizes: 8x8 and 8x12 -> 32x32 and 32x48), 4 candidates each, 4 pairs each; 2 prompts."""
    root = tmp_path_factory.mktemp("pool")
    pairs, degraded = [], []
    for i, (name, (h, w)) in enumerate({"a": (8, 8), "b": (8, 12), "c": (8, 8)}.items()):
        _png(root / "lr" / f"{name}.png", h, w, i)
        _png(root / "hr" / f"{name}.png", 4 * h, 4 * w, 50 + i)
        degraded.append((name, f"hr/{name}.png", f"lr/{name}.png", "a photo" if i else "", i))
        for s in range(4):
            _png(root / "pool" / name / f"seed_{s:04d}.png", 4 * h, 4 * w, 100 + 10 * i + s)
        for win, lose, wi in ((0, 3, 1.2), (1, 2, 0.8), (0, 2, 1.1), (1, 3, 0.9)):
            pairs.append(
                (name, win, lose, f"{name}/seed_{win:04d}.png", f"{name}/seed_{lose:04d}.png",
                 str(root / "lr" / f"{name}.png"), 0.9, 0.1, wi, 1.0 + 0.1 * i, "a photo" if i else "")
            )  # fmt: skip
    cols = (
        "image_id win_seed lose_seed win_path lose_path lr_path win_reward lose_reward w_intra w_inter prompt"
    )
    df = pd.DataFrame(pairs, columns=cols.split())
    df.assign(weight=df.w_intra * df.w_inter).to_parquet(root / "pool" / "pref_pairs.parquet")
    pd.DataFrame(degraded, columns=["image_id", "hr_path", "lr_path", "prompt", "seed"]).to_parquet(
        root / "pairs.parquet"
    )
    return root


def _equal_batches(a, b):
    ta, ca, cond_a, wa = a
    tb, cb, cond_b, wb = b
    assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    assert ca.dtype == cb.dtype and torch.equal(ca, cb)
    assert cond_a.keys() == cond_b.keys() and all(torch.equal(cond_a[k], cond_b[k]) for k in cond_a)
    assert torch.equal(wa, wb)


def _store(tmp_path, bb, ex, world=1):
    """A store of ``ex`` built by ``world`` simulated processes, each encoding only its share."""
    folder, enc = tmp_path / "frozen", FrozenEncoder(bb, 4)
    (folder / "examples").mkdir(parents=True)
    for rank in range(world):
        writer = frozen_store._Writer(folder, rank)
        frozen_store.encode_share(enc, ex, writer, rank, world)
        writer.close()
    frozen_store.write_index(folder, ex, world, "fp")
    return frozen_store.FrozenStore(folder, enc)


@pytest.mark.parametrize("backbone", ["sd2-tiny", "flux-tiny"])
def test_store_gives_the_batches_and_dpo_losses_of_encoding_every_step(backbone, pool, tmp_path):
    bb = load_backbone(backbone, dtype="fp32").to("cpu", torch.float32)
    ex = read_examples(pool / "pool", "dpo")
    store, fly = _store(tmp_path, bb, ex), OnTheFly(FrozenEncoder(bb, 4), ex)
    kinds = {b["kind"] for b in store.manifest["blocks"]}
    # SD2's control is the upsampled LR: stored as the 8-bit LR, never as an fp32 copy; FLUX's is latents
    assert (frozen_store.LR8 in kinds) == (backbone == "sd2-tiny") and ("control" in kinds) == (
        backbone != "sd2-tiny"
    )
    assert len(store) == len(ex) == 12
    for idx in ([0, 9], [11, 2], [4, 6]):  # a and c are 32x32, b is 32x48
        a, b = store.batch(idx), fly.batch(idx)
        _equal_batches(a, b)
        losses = []
        for targets, control, cond, w in (a, b):
            nb = noise_batch(bb, targets, control, cond, torch.Generator().manual_seed(3))
            losses.append(dpo_objective(bb, bb.controlnet, lambda: _ref(bb), nb, w, beta=500.0)[0].item())
        assert losses[0] == losses[1] and np.isfinite(losses[0])


def _ref(bb):
    import contextlib

    return contextlib.nullcontext(bb.controlnet)


def test_sharded_build_equals_one_process_and_sft_prompt_dropout(pool, tmp_path):
    bb = load_backbone("sd2-tiny", dtype="fp32").to("cpu", torch.float32)
    ex = read_examples(pool, "sft")
    one, two = _store(tmp_path / "one", bb, ex), _store(tmp_path / "two", bb, ex, world=2)
    ranks = {b["file"].split("-")[1] for b in two.manifest["blocks"]}
    assert ranks == {"r000", "r001"}  # each process wrote its own share
    fly = OnTheFly(FrozenEncoder(bb, 4), ex)
    for idx, drop in (([0, 2], [False, True]), ([2, 0], [True, False])):
        _equal_batches(one.batch(idx, drop), fly.batch(idx, drop))
        _equal_batches(two.batch(idx, drop), fly.batch(idx, drop))
    nb = noise_batch(bb, *one.batch([0, 2])[:3], torch.Generator().manual_seed(0))
    nb2 = noise_batch(bb, *fly.batch([0, 2])[:3], torch.Generator().manual_seed(0))
    assert sft_objective(bb, bb.controlnet, nb)[0].item() == sft_objective(bb, bb.controlnet, nb2)[0].item()


def test_bf16_latents_are_stored_bit_for_bit(pool, tmp_path):
    bb = load_backbone("flux-tiny", dtype="fp32").to("cpu", torch.bfloat16, controlnet_dtype=torch.float32)
    ex = read_examples(pool / "pool", "dpo")
    store, fly = _store(tmp_path, bb, ex), OnTheFly(FrozenEncoder(bb, 4), ex)
    a, b = store.batch([0, 1]), fly.batch([0, 1])
    assert a[0].dtype == torch.bfloat16
    _equal_batches(a, b)


def test_training_inputs_reuses_a_matching_store_and_rebuilds_another(pool, tmp_path, monkeypatch):
    bb = load_backbone("sd2-tiny", dtype="fp32").to("cpu", torch.float32)
    cfg = SimpleNamespace(
        cache=True, output=tmp_path, data=pool / "pool", mode="dpo", hpo="both", backbone="sd2-tiny",
        base=None, mixed_precision="no", upscale=4,
    )  # fmt: skip
    built = []
    real = frozen_store.build
    monkeypatch.setattr(frozen_store, "build", lambda *a: built.append(1) or real(*a))
    store = frozen_store.training_inputs(cfg, bb, OneProcess(), "sha1")
    assert len(built) == 1 and len(store) == 12
    manifest = tmp_path / "frozen" / frozen_store.MANIFEST
    assert json.loads(manifest.read_text())["fingerprint"] == frozen_store.fingerprint(cfg, "sha1")
    frozen_store.training_inputs(cfg, bb, OneProcess(), "sha1")
    assert len(built) == 1  # same inputs: reused
    cfg.hpo = "none"
    again = frozen_store.training_inputs(cfg, bb, OneProcess(), "sha1")
    assert len(built) == 2 and torch.equal(again.batch([0, 1])[3], torch.ones(2))  # new weights
    frozen_store.training_inputs(cfg, bb, OneProcess(), "sha2")  # another data table
    assert len(built) == 3
    cfg.cache = False
    assert isinstance(frozen_store.training_inputs(cfg, bb, OneProcess(), "sha2"), OnTheFly)


def test_an_image_replaced_in_place_is_encoded_again_and_refuses_a_resume(
    pool, tmp_path, monkeypatch, capsys
):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pool, data)
    df = pd.read_parquet(data / "pool" / "pref_pairs.parquet")
    df.assign(lr_path=df.lr_path.str.replace(str(pool), str(data))).to_parquet(
        data / "pool" / "pref_pairs.parquet"
    )
    bb = load_backbone("sd2-tiny", dtype="fp32").to("cpu", torch.float32)
    cfg = SimpleNamespace(
        cache=True, output=tmp_path / "out", data=data / "pool", mode="dpo", hpo="both", backbone="sd2-tiny",
        base=None, mixed_precision="no", upscale=4,
    )  # fmt: skip
    built = []
    real = frozen_store.build
    monkeypatch.setattr(frozen_store, "build", lambda *a: built.append(1) or real(*a))
    before = frozen_store.training_inputs(cfg, bb, OneProcess(), "sha1").batch([0])
    frozen_store.check_unchanged(cfg.output)  # nothing changed: a resume goes on
    target = data / "pool" / "a" / "seed_0000.png"  # the winner of example 0
    _png(target, 32, 32, 999)  # same path, same table, new content
    with pytest.raises(ValueError, match=r"--resume: .*seed_0000\.png changed since"):
        frozen_store.check_unchanged(cfg.output)
    after = frozen_store.training_inputs(cfg, bb, OneProcess(), "sha1").batch([0])
    assert len(built) == 2 and "seed_0000.png changed since" in capsys.readouterr().err
    assert not torch.equal(before[0], after[0])  # the new image's latents, not the stale ones
    assert torch.equal(after[0], OnTheFly(FrozenEncoder(bb, 4), read_examples(cfg.data, "dpo")).batch([0])[0])
    frozen_store.check_unchanged(cfg.output)  # recorded again: a resume of the new run goes on
    frozen_store.training_inputs(cfg, bb, OneProcess(), "sha1")
    assert len(built) == 2


def test_no_cache_records_the_images_for_a_resume(pool, tmp_path):
    import os

    bb = load_backbone("sd2-tiny", dtype="fp32").to("cpu", torch.float32)
    cfg = SimpleNamespace(cache=False, output=tmp_path, data=pool, mode="sft", hpo="both", upscale=4)
    assert isinstance(frozen_store.training_inputs(cfg, bb, OneProcess(), "sha"), OnTheFly)
    assert (tmp_path / "data_files.parquet").is_file() and not (tmp_path / "frozen").exists()
    frozen_store.check_unchanged(tmp_path)
    lr = pool / "lr" / "b.png"
    st = os.stat(lr)
    try:
        os.utime(lr, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(ValueError, match=r"b\.png changed since"):
            frozen_store.check_unchanged(tmp_path)
    finally:
        os.utime(lr, ns=(st.st_atime_ns, st.st_mtime_ns))
