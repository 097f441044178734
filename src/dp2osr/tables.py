"""Every table the pipeline writes, in one place: columns, types, schema version, and read / validate / write.

The stages hand their results to each other through these Parquet tables, and each table carries what the
next stage needs, so no stage looks for a file beside another's output:

    pairs.parquet       degrade -> sample, train --mode sft   LR/HR paths of the crops
    candidates.parquet  sample  -> score                      candidate paths, LR/HR, prompt, model, hashes
    scores.parquet      score   -> eval, report, curve        raw metric values (long: one row per metric)
    rewards.parquet     score   -> pair, eval, report         hybrid reward, LR/HR, prompt, model
    pref_pairs.parquet  pair    -> train --mode dpo           winner/loser paths, LR, HPO weights

Paths are stored relative to the table's own folder (a folder of results can be moved) and read back as
absolute paths. What a path read from a table may name (checked by `read`, each refusal a ValueError naming the
table, row, column and value, before any file is opened):

- every path column names an image file (its suffix is an image suffix), so a table cannot make a stage open
  or embed another kind of file (``/etc/passwd``);
- a column the table's own stage wrote inside the table's folder (``Schema.inside``: a pool's candidates) must
  resolve inside that folder;
- every path must resolve inside the table's *roots*: the table's own folder, the folders recorded in the
  table when it was written (``write`` records, relative to the table's folder, the folders of the paths that
  lie outside it: a pool's LR and HR in the degrade folder, preference pairs in the pool), the folders a
  caller passes as ``roots``, and the folders the user vouches for with a stage's ``--data-root``
  (`with_data_roots`). A path edited to ``../outside/secret.png`` is refused;
- a table a user may write by hand as a stage's input (``Schema.user_input``: a pairs table for ``sample`` or
  ``train --mode sft``, preference pairs for ``train --mode dpo``) may also hold absolute paths, anywhere: an
  absolute path there is the user's own choice of image. Its relative paths follow the rule above (they may
  not climb out of the table's folder). The tables dp2osr writes hold relative paths only.

Containment is judged on the normalised path's text, without following symbolic links (a data folder reached
through a link is the user's choice). Tables only ever written with relative paths inside their folder (a
degrade folder's pairs table) carry no recorded roots and are written as before.

Image IDs name output files and folders (``OUT/ID/seed_XXXX.png``), so every table refuses an ID that is not a
plain file name (``../x``, ``/abs``, ``..``) on read and on write. Facts about the whole table (the reward weights it was computed with, the pair ratio of the
model that sampled it) travel in the Parquet file's key-value metadata under ``dp2osr``, together with the
table's name and schema version; a table without that key is version 1 (written before versions existed).
The column docs are in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dp2osr.images import IMAGE_SUFFIXES, atomic_write
from dp2osr.paths import is_inside, name_problem

META_KEY = b"dp2osr"


@dataclass(frozen=True)
class Schema:
    """One table: its default file name, version, required and optional columns (name -> dtype), the columns
    holding paths, the path columns that lie inside the table's own folder, the columns that identify a row,
    and whether users write it by hand as a stage's input (its absolute paths are then accepted anywhere)."""

    name: str
    filename: str
    version: int
    columns: dict[str, str]
    optional: dict[str, str]
    paths: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    inside: tuple[str, ...] = ()
    user_input: bool = False


_MODEL = {"backbone": "str", "base": "str", "controlnet": "str"}

PAIRS = Schema(
    "pairs",
    "pairs.parquet",
    1,
    {"image_id": "str", "hr_path": "str", "lr_path": "str"},
    {"source": "str", "seed": "int64", "source_sha": "str"},
    paths=("hr_path", "lr_path"),
    key=("image_id",),
    user_input=True,
)
CANDIDATES = Schema(
    "candidates",
    "candidates.parquet",
    2,
    {"image_id": "str", "seed": "int64", "path": "str", "lr_path": "str", "hr_path": "str"},
    {**_MODEL, "prompt": "str", "sha": "str", "lr_sha": "str", "hr_sha": "str", "options_sha": "str"},
    paths=("path", "lr_path", "hr_path"),
    key=("image_id", "seed"),
    inside=("path",),
)
SCORES = Schema(
    "scores",
    "scores.parquet",
    1,
    {"image_id": "str", "seed": "int64", "metric": "str", "value": "float64"},
    {},
    key=("image_id", "seed", "metric"),
)
REWARDS = Schema(
    "rewards",
    "rewards.parquet",
    2,
    {"image_id": "str", "seed": "int64", "path": "str", "reward": "float64"},
    {"lr_path": "str", "hr_path": "str", "prompt": "str", **_MODEL},
    paths=("path", "lr_path", "hr_path"),
    key=("image_id", "seed"),
)
PREF_PAIRS = Schema(
    "pref_pairs",
    "pref_pairs.parquet",
    1,
    {
        "image_id": "str",
        "win_seed": "int64",
        "lose_seed": "int64",
        "win_path": "str",
        "lose_path": "str",
        "lr_path": "str",
        "win_reward": "float64",
        "lose_reward": "float64",
        "w_intra": "float64",
        "w_inter": "float64",
        "weight": "float64",
    },
    {"prompt": "str"},
    paths=("win_path", "lose_path", "lr_path"),
    user_input=True,
)
SCHEMAS = {s.name: s for s in (PAIRS, CANDIDATES, SCORES, REWARDS, PREF_PAIRS)}


def table_path(schema: Schema, path: Path) -> Path:
    """``path / schema.filename`` when ``path`` is a folder (an existing one, or a name without a suffix: a
    stage's output folder), else ``path`` itself."""
    path = Path(path)
    return path / schema.filename if path.is_dir() or not path.suffix else path


def read_meta(path: Path) -> dict:
    """The ``dp2osr`` metadata of a table (``{}`` for a table written without it)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def _each_distinct(values: pd.Series, fn) -> pd.Series:
    """``fn`` of every value of the string column ``values`` ("" stays ""), called once per distinct value (a
    pool's LR path recurs in every row of its image; the column is converted at once, not row by row)."""
    codes, distinct = pd.factorize(values)
    made = [fn(p) if p else "" for p in distinct]
    return pd.Series(pd.array(made, dtype="str")).take(codes).reset_index(drop=True)


def _relative(folder: Path, values: pd.Series) -> pd.Series:
    """Paths as the caller names them (absolute, or relative to the working folder) made relative to ``folder``."""
    base = os.path.abspath(folder)
    return _each_distinct(values, lambda p: os.path.relpath(p, base))


def validate(schema: Schema, df: pd.DataFrame, where: str, allow_empty: bool = False) -> pd.DataFrame:
    """``df`` with the schema's columns typed (optional string columns filled with ""); a missing column, an
    empty table (unless ``allow_empty``) or a duplicated key is a ValueError naming ``where``."""
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where}: not a {schema.name} table: lacks column(s) {missing} (has {list(df.columns)})"
        )
    if df.empty and not allow_empty:
        raise ValueError(f"{where}: the {schema.name} table is empty")
    df = df.reset_index(drop=True)
    for col, kind in {**schema.columns, **schema.optional}.items():
        if col not in df.columns:
            continue
        if kind == "str":
            df[col] = df[col].fillna("").astype(str)
        else:
            df[col] = df[col].astype(kind)
    if "image_id" in df.columns:
        _check_ids(df["image_id"], where)
    if schema.key:
        dup = df.duplicated(list(schema.key))
        if dup.any():
            first = df.loc[dup, list(schema.key)].iloc[0].to_dict()
            raise ValueError(f"{where}: duplicate {schema.name} row {first}")
    return df


def _check_ids(ids: pd.Series, where: str) -> None:
    """Refuse an image ID that is not a plain file name (it names output files), naming the first such row."""
    codes, distinct = pd.factorize(ids)
    problems = [name_problem(i) for i in distinct]
    bad = [k for k, p in enumerate(problems) if p is not None]
    if bad:
        row = int(np.flatnonzero(np.isin(codes, bad))[0])
        image_id, problem = distinct[codes[row]], problems[codes[row]]
        raise ValueError(
            f"{where}: row {row}: image_id {image_id!r} {problem}; an image ID must be a plain file name"
        )


def _roots(folder: Path, meta: dict, roots: tuple[Path, ...] | None) -> list[str]:
    """The folders a table's paths may lie in (module docstring): its own folder first, then the folders
    recorded in its metadata (relative to it), then the caller's ``roots``; absolute and normalised."""
    own = os.path.abspath(folder)
    recorded = meta.get("roots", [])
    if not isinstance(recorded, list) or not all(isinstance(r, str) and r for r in recorded):
        recorded = []
    extra = [os.path.abspath(r) for r in roots or ()]
    return [own, *(os.path.normpath(os.path.join(own, r)) for r in recorded), *extra]


def _outside_roots(folder: Path, df: pd.DataFrame, columns: tuple[str, ...]) -> list[str]:
    """The fewest folders (relative to ``folder``, sorted) holding every path of ``df``'s ``columns`` (absolute,
    normalised) that lies outside ``folder``: each such path's parent, less those inside another."""
    own = os.path.abspath(folder)
    parents = {
        os.path.dirname(p)
        for col in columns
        if col in df.columns
        for p in df[col].unique()
        if p and not is_inside(p, [own])
    }

    def nested(d: str) -> bool:
        up = os.path.dirname(d)
        while up != d:
            if up in parents:
                return True
            d, up = up, os.path.dirname(up)
        return False

    return sorted(os.path.relpath(d, own) for d in parents if not nested(d))


def _inside_any(roots: list[str]):
    """`dp2osr.paths.is_inside` against ``roots`` as a function of the path, one set look-up per separator of
    the path instead of one comparison per root (a pairs table records a folder per image of its pool)."""
    exact, folders = set(roots), {r.rstrip(os.sep) for r in roots}

    def inside(path: str) -> bool:
        if path in exact:
            return True
        # path.startswith(r + sep) holds exactly when path[:i] == r at some separator i of path.
        i = path.find(os.sep)
        while i >= 0:
            if path[:i] in folders:
                return True
            i = path.find(os.sep, i + 1)
        return False

    return inside


def _path_problem(schema: Schema, col: str, value: str, raw: str, trusted: list[str], inside) -> str | None:
    """Why ``value`` (stored as ``raw``) may not stand in ``col`` of a ``schema`` table (module docstring), or
    None; ``trusted``: the table's roots, its own folder first; ``inside``: `_inside_any` of ``trusted``."""
    own = trusted[:1]
    if not value:
        return None
    if "\0" in value or os.path.splitext(value)[1].lower() not in IMAGE_SUFFIXES:
        return f"is not an image file ({', '.join(IMAGE_SUFFIXES)})"
    if col in schema.inside and not is_inside(value, own):
        return f"lies outside the table's folder {own[0]}"
    if inside(value) or (schema.user_input and os.path.isabs(raw)):
        return None
    return (
        f"lies outside the table's folder, the folders it was written with and the --data-root folders "
        f"{trusted} (pass --data-root FOLDER to vouch for a folder of yours)"
        + ("; a hand-written table may name images elsewhere by absolute path" if schema.user_input else "")
    )


def _resolved(schema: Schema, col: str, stored: pd.Series, where: Path, trusted: list[str]) -> pd.Series:
    """Column ``col`` of a ``schema`` table, its stored paths made absolute against the table's folder (empty
    stays empty; no filesystem calls) and checked against the rules on what they may name (module docstring),
    each distinct value once (a pool's LR path recurs in every row of its image); the first refused row is
    named. ``trusted``: the table's roots, its own folder first."""
    inside = _inside_any(trusted)
    codes, distinct = pd.factorize(stored)
    values = [os.path.normpath(os.path.join(trusted[0], p)) if p else "" for p in distinct]
    problems = [_path_problem(schema, col, v, r, trusted, inside) for v, r in zip(values, distinct)]
    bad = [k for k, p in enumerate(problems) if p is not None]
    if bad:
        row = int(np.flatnonzero(np.isin(codes, bad))[0])
        raw, value = distinct[codes[row]], values[codes[row]]
        shown = f"{raw!r}" + ("" if raw == value else f" (resolves to {value})")
        raise ValueError(f"{where}: row {row}: {col} {shown} {problems[codes[row]]}; refused")
    return pd.Series(pd.array(values, dtype=stored.dtype)).take(codes).reset_index(drop=True)


def read(
    schema: Schema, path: Path, columns: list[str] | None = None, *, roots: tuple[Path, ...] | None = None
) -> tuple[pd.DataFrame, dict]:
    """(the table at ``path`` (a file or a stage's output folder) validated, with absolute paths; its metadata).

    A table of a newer schema version than this dp2osr knows is refused with the versions named; a path that
    is not an image, a column of ``Schema.inside`` outside the table's folder and a path outside the table's
    roots (its folder, the folders recorded in it, and ``roots``) are refused naming the row (module
    docstring).
    """
    path = table_path(schema, path)
    if not path.is_file():
        raise FileNotFoundError(f"{schema.name} table not found: {path}")
    meta = read_meta(path)
    version = int(meta.get("version", 1))
    if version > schema.version:
        raise ValueError(
            f"{path}: {schema.name} table of schema version {version}; this dp2osr reads up to "
            f"{schema.version}: update dp2osr"
        )
    df = validate(schema, pd.read_parquet(path, columns=columns), str(path))
    trusted = _roots(path.parent, meta, (*(roots or ()), *_DATA_ROOTS.get()))
    for col in schema.paths:
        if col in df.columns:
            df[col] = _resolved(schema, col, df[col], path, trusted)
    return df, meta


def write(schema: Schema, df: pd.DataFrame, path: Path, meta: dict | None = None) -> Path:
    """Write ``df`` as the table ``path`` (a file or a folder), atomically; returns the file's path.

    Path columns hold paths as the caller names them (absolute, or relative to the working folder); they are
    stored relative to the table's folder, and the folders of those outside it go into the metadata as
    ``roots`` (what `read` accepts them in). The schema's name and version (and ``meta``) go into the metadata;
    version-1 tables without ``meta`` and without paths outside their folder are written without metadata, as
    they always were.
    """
    path = table_path(schema, path)
    df = validate(schema, df.copy(), str(path), allow_empty=True)
    for col in schema.paths:
        if col in df.columns:
            df[col] = _each_distinct(df[col], lambda p: os.path.normpath(os.path.abspath(p)))
    meta = {k: v for k, v in (meta or {}).items() if k != "roots"}
    outside = _outside_roots(path.parent, df, schema.paths)
    if outside:
        meta["roots"] = outside
    for col in schema.paths:
        if col in df.columns:
            df[col] = _relative(path.parent, df[col])
    if schema.version == 1 and not meta:
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    info = {**(meta or {}), "schema": schema.name, "version": schema.version}
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), META_KEY: json.dumps(info).encode()}
    )
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


# ------------------------------------------------------------------------------ roots the user vouches for
# The --data-root folders of the stage running now: set around a stage's run (`with_data_roots`) and added to
# the roots of every table it reads, however deep in the engine the read happens.
_DATA_ROOTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("data_roots", default=())


def split_roots(values) -> tuple[str, ...]:
    """The folders of ``--data-root`` values (each may join several with ``os.pathsep``), absolute and
    normalised; a ValueError names one that is not a folder."""
    out = []
    for value in values or ():
        for part in str(value).split(os.pathsep):
            if not part:
                continue
            if not os.path.isdir(part):
                raise ValueError(f"--data-root {part!r} is not a folder")
            out.append(os.path.abspath(part))
    return tuple(out)


@contextlib.contextmanager
def data_roots(values):
    """Within the block, every `read` also accepts paths inside the folders of ``values`` (`split_roots`)."""
    token = _DATA_ROOTS.set(_DATA_ROOTS.get() + split_roots(values))
    try:
        yield
    finally:
        _DATA_ROOTS.reset(token)


def with_data_roots(run):
    """A stage's ``run(cfg, ...)`` with its ``cfg.data_root`` folders vouched for (`data_roots`) while it runs."""

    @functools.wraps(run)
    def wrapped(cfg, *args, **kwargs):
        with data_roots(getattr(cfg, "data_root", ())):
            return run(cfg, *args, **kwargs)

    return wrapped
