"""Configuration: one dataclass per stage is the single source of truth.

Precedence is dataclass defaults < YAML file (``--config``) < command-line flags. Every field becomes a flag
(``field_name`` -> ``--field-name``) whose help text is the field's ``metadata["help"]``; ``choices`` in the
metadata restrict values. Unknown YAML keys are an error. The resolved config is saved beside every output
(``save_config``) so a run can be repeated exactly.

Flags and YAML values are checked in one place (`_coerce`), before any work, against the type of their field:
``int`` takes integers only (not ``"2"``, ``1.5`` or ``[4]``), ``float`` any number (YAML's ``2e-5`` included),
``bool`` only true/false, ``str`` and ``Path`` only strings, ``X | None`` also null, and ``list[X]`` a list of X
or a single X (a one-element list: ``metrics: fsim`` is ``[fsim]``). A wrong value is a one-line ValueError
naming the file, the key, the value and what is allowed. Ranges and finiteness are each config's
``__post_init__`` (`check_range`, `check_seed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
MAX_SEED = 2**40 - 1  # seeds are combined with step and sample counters into torch's 64-bit generator seeds


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, except that ``2e-5`` (exponent, no dot) is a number, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def field(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: list | None = None,
    run_only: bool = False,
    repeatable: bool = False,
    **kw: Any,
) -> Any:
    """A dataclass field with a help string (and optional choices) for the CLI.

    ``run_only`` marks an option that does not change what a run produces (paths, device, batch sizes that
    give the same outputs, resume switches): a resumed run may change it (``check_resume``). ``repeatable``: a
    list option whose flag may be given several times, the values adding up.
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = list(choices)
    if run_only:
        meta["run_only"] = True
    if repeatable:
        meta["repeatable"] = True
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def data_root_field() -> Any:
    """The ``--data-root`` option of the stages that read tables (`tables.with_data_roots` applies it)."""
    return field(
        [],
        help="a folder whose images the tables this stage reads may name (repeatable, or several joined by "
        f"{os.pathsep!r}). A path in a table must lie inside the table's own folder, the folders recorded in "
        "the table when it was written, or a --data-root; any other is refused naming the row",
        run_only=True,
        repeatable=True,
    )


def nested(cls: type, help: str, fixed: list[str] | tuple[str, ...], **values: Any) -> Any:
    """A field holding a whole stage config (``cls``) inside a config that composes stages.

    Its default is ``cls(**values)``; ``fixed`` names the options the composing config sets itself before it
    runs the stage (paths, the model, seeds; a required path holds ``.`` until then): they get no flag and may
    not be given in YAML. Every other option of ``cls`` becomes a flag ``--NAME.option`` (``NAME`` = this
    field's name) and a YAML key under ``NAME:``.
    """
    required = [
        f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING
    ]
    values = {**{name: Path(".") for name in required if name in fixed}, **values}
    meta = {"help": help, "nested": cls, "fixed": tuple(fixed)}
    return dataclasses.field(default_factory=lambda: cls(**values), metadata=meta)


def _nested_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "nested" in f.metadata]


def has_nested(cls: type) -> bool:
    """Whether ``cls`` composes stage configs (`nested` fields)."""
    return bool(_nested_fields(cls))


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field, plus ``--config`` for a YAML file; a `nested` stage config gets a
    group of ``--NAME.option`` flags."""
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of options (flags given here override it)"
    )
    _add_fields(parser, cls, "", ())
    for f in _nested_fields(cls):
        sub = f.metadata["nested"]
        group = parser.add_argument_group(f"{f.name} options (--{f.name}.OPTION)", f.metadata["help"])
        _add_fields(group, sub, f"{f.name}.", f.metadata["fixed"], f.default_factory())  # type: ignore[misc]


def _add_fields(parser: Any, cls: type, prefix: str, skip: tuple[str, ...], instance: Any = None) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "nested" in f.metadata:
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + prefix + f.name.replace("_", "-")
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        help_text = f.metadata.get("help", "")
        required = instance is None and default is None and not optional and f.default is dataclasses.MISSING
        # Each default said once: not when the help states it (unless a composing config changed it), not for
        # None (an option resolved elsewhere).
        changed = instance is not None and default != getattr(cls, f.name, default)
        if not required and default is not None and ("default" not in help_text.lower() or changed):
            help_text += f" ({'here' if changed else 'default'}: {_shown(default)})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": prefix + f.name}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (inner,) = typing.get_args(tp) or (str,)
            kwargs.update(nargs="+", type=inner)
            if f.metadata.get("repeatable"):
                kwargs["action"] = "extend"
        elif tp is Path:
            kwargs["type"] = Path
        elif tp in (int, float, str):
            kwargs["type"] = tp
        parser.add_argument(flag, **kwargs)


def _shown(value: Any) -> str:
    """A default as a user types it (lists space-separated)."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def build_config(cls: type[T], args: argparse.Namespace) -> T:
    """Resolve defaults < YAML (``args.config``) < flags into an instance of ``cls``."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path is not None:
        values.update(load_yaml(cls, Path(config_path)))
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in vars(args).items():
        head, dot, tail = key.partition(".")
        if dot and head in names:
            values.setdefault(head, {})[tail] = value
        elif key in names:
            values[key] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ValueError(
            "missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    return cls(**_coerce(cls, values))


def load_yaml(cls: type, path: Path) -> dict[str, Any]:
    """Read a YAML mapping of options for ``cls``, each value checked against its field (`_coerce`); unknown
    keys, a file that is no YAML mapping and a value of the wrong type are one-line ValueErrors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; allowed: {sorted(names)}")
    return _typed(cls, data, f"{path}: ")


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` (``{}`` when empty); a file that is not UTF-8 YAML is a ValueError naming it."""
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader) or {}  # noqa: S506 (SafeLoader)
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a text file (not UTF-8); give a YAML file of option: value"
        ) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{at}: {problem}") from None


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (flags and YAML) checked and converted to the types of ``cls``'s fields; a `nested` stage
    config's mapping becomes that stage's config."""
    nested = {f.name: f for f in _nested_fields(cls)}
    out = _typed(cls, values, "")
    for name, value in out.items():
        if name in nested:
            out[name] = _nested_value(nested[name], value)
    return out


def _typed(cls: type, values: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """Each value of ``values`` as the type of its field of ``cls`` (`_as_type`); a `nested` field's mapping
    is checked against its stage config, its `fixed` options refused. ``where`` names the source in errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        f = fields[name]
        if "nested" in f.metadata and not dataclasses.is_dataclass(value):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} must be a mapping of its options, got {value!r}")
            allowed = {g.name for g in dataclasses.fields(f.metadata["nested"])} - set(f.metadata["fixed"])
            unknown = sorted(map(str, set(value) - allowed))
            if unknown:
                raise ValueError(f"{where}unknown {name} option(s) {unknown}; allowed: {sorted(allowed)}")
            out[name] = _typed(f.metadata["nested"], value, where, f"{name}.")
        elif "nested" in f.metadata:
            out[name] = value
        else:
            out[name] = _as_type(value, hints[name], f.metadata.get("choices"), f"{where}{prefix}{name}")
    return out


def _as_type(value: Any, tp: Any, choices: list | None, key: str) -> Any:
    """``value`` as field type ``tp`` (int, float, bool, str, Path, list[X], X | None), else a ValueError."""
    inner, optional = _base_type(tp)
    if value is None and optional:
        return None
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner) or (str,)
        items = value if isinstance(value, (list, tuple)) else [value]  # one value: a one-element list
        return [_as_type(v, item, choices, f"{key}[{i}]") for i, v in enumerate(items)]
    converted = _scalar(value, inner)
    if converted is _BAD:
        described = _DESCRIBED.get(inner, getattr(inner, "__name__", str(inner)))
        allowed = described + (" or null" if optional else "")
        raise ValueError(f"{key}: expected {allowed}, got {_shown_value(value)}")
    if choices is not None and converted not in choices:
        raise ValueError(f"{key}: expected one of {list(choices)}, got {_shown_value(value)}")
    return converted


_BAD = object()
_DESCRIBED = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    Path: "a path (a string)",
}


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` when it is one (an int as a float, a string as a Path), else ``_BAD``."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        return value if is_number and isinstance(value, int) else _BAD
    if tp is float:
        if not is_number:
            return _BAD
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            return _BAD
    if tp is str:
        return value if isinstance(value, str) else _BAD
    if tp is Path:
        return Path(value) if isinstance(value, (str, Path)) else _BAD
    return value  # a type without a check here (e.g. a union of several types)


def _shown_value(value: Any) -> str:
    """A value in an error message: as YAML would show ``None`` (null), else its repr."""
    return "null" if value is None else repr(value)


def _nested_value(f: dataclasses.Field, values: dict[str, Any]) -> Any:
    """The default stage config of nested field ``f`` with ``values`` applied (validated by its own checks)."""
    if dataclasses.is_dataclass(values):
        return values
    return dataclasses.replace(f.default_factory(), **_coerce(f.metadata["nested"], values))  # type: ignore[misc]


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config dataclass (paths as strings)."""
    return {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b": value}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default, as `to_dict` writes it, flattened (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return _flat(out)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML (``.yaml``) or JSON (anything else), atomically: written aside, then
    renamed onto ``path``, so a killed run leaves the old config or the new one, and a symbolic link at
    ``path`` is replaced, never written through."""
    from dp2osr.images import atomic_write  # on use: images pulls in torch, the CLI's help does not need it

    data = to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def check_choice(name: str, value: Any, allowed: list | tuple) -> None:
    """Raise a ValueError naming ``name`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    integer: bool = False,
) -> None:
    """Raise a one-line ValueError naming ``--name`` unless ``value`` is a finite number (``integer``: an
    integer) >= ``low`` (``above``: > ``low``) and <= ``high`` (None: no bound)."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (low is None or value > low or (value == low and not above))
    if not (ok and (high is None or value <= high)):
        kind = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            span = f"in {'(' if above else '['}{low}, {high}]"
        elif low is not None:
            span = f"{'>' if above else '>='} {low}"
        else:
            span = f"<= {high}"
        raise ValueError(f"--{name.replace('_', '-')} must be {kind} {span}, got {value!r}")


def check_seed(value: Any, name: str = "seed", high: int = MAX_SEED) -> None:
    """Raise a one-line ValueError naming ``--name`` unless ``value`` is a seed: an integer in [0, high]."""
    check_range(name, value, 0, high, integer=True)


def check_choices(cfg: Any) -> None:
    """Check every field of ``cfg`` whose `field` lists ``choices`` (each element, for a list): the one check
    of those options for flags, YAML and Python callers alike (a ValueError naming the option)."""
    for f in dataclasses.fields(cfg):
        if "choices" not in f.metadata:
            continue
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                check_choice(f.name, v, f.metadata["choices"])


def run_only_fields(cls: type) -> set[str]:
    """Names of the fields marked ``run_only`` (options that may change when a run is resumed); those of a
    `nested` stage config as ``NAME.option``."""
    out = {f.name for f in dataclasses.fields(cls) if f.metadata.get("run_only")}
    for f in _nested_fields(cls):  # its fixed options derive from the composing config's, compared there
        out |= {f"{f.name}.{name}" for name in {*run_only_fields(f.metadata["nested"]), *f.metadata["fixed"]}}
    return out


def check_resume(
    cfg: Any, path: Path, what: str = "outputs", hint: str = "use --overwrite or another --output"
) -> None:
    """Refuse to mix outputs made with different options in one folder.

    ``path`` is the config saved by an earlier run; the fields marked ``run_only`` (device, paths, ...) may
    change between runs, every other option must match. Does nothing when ``cfg.overwrite`` is set.
    """
    run_only = run_only_fields(type(cfg))
    if getattr(cfg, "overwrite", False) or not Path(path).is_file():
        return
    old = read_yaml(path)
    if not isinstance(old, dict):
        raise ValueError(f"{path}: not a saved config (a mapping of option: value); {hint}")
    old = _flat(old)
    new = _flat(to_dict(cfg))
    # An option the saved config lacks came with a newer dp2osr: the earlier run used its default.
    old = {**{k: v for k, v in _defaults(type(cfg)).items() if k not in old}, **old}
    changed = sorted(k for k in new if k not in run_only and old.get(k) != new[k])
    if changed:
        raise ValueError(
            f"{Path(path).parent} holds {what} made with other options ({', '.join(changed)}); {hint}"
        )


def is_saved_config(path: Path, cls: type) -> bool:
    """Whether ``path`` is a config `save_config` wrote for ``cls``: a YAML mapping of its options only."""
    try:
        data = read_yaml(path)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data) and set(data) <= {f.name for f in dataclasses.fields(cls)}
