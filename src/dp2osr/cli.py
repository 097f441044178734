"""The ``dp2osr`` command: one sub-command per pipeline stage.

Each stage module defines a config dataclass and ``run(cfg)``; this file only maps names to them (imported
lazily so ``dp2osr --help`` is instant) and turns errors into one-line messages and exit codes: 2 for bad
input (``ValueError`` / ``FileNotFoundError``, before any work), the ``exit_code`` of a `dp2osr.errors`
``StageError`` (1: some inputs failed, the rest was written; 3: training diverged), 1 for an I/O fault during
the work (a full disk, a read-only file system: the file named, finished outputs kept), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys

from dp2osr.config import add_arguments, build_config, has_nested
from dp2osr.errors import StageError

# name -> (module, config class, one-line help); each module's `run(cfg)` does the work
Spec = tuple[str, str, str]
COMMANDS: dict[str, Spec] = {
    "upscale": ("dp2osr.upscale", "UpscaleConfig", "super-resolve image(s) with a ControlNet SR model"),
    "degrade": ("dp2osr.degrade", "DegradeConfig", "HR photos -> LR/HR training pairs (Real-ESRGAN-style)"),
    "sample": ("dp2osr.sample", "SampleConfig", "M seeded SR candidates per LR image (resumable)"),
    "score": ("dp2osr.score", "ScoreConfig", "IQA scores and hybrid reward for every candidate"),
    "pair": ("dp2osr.pair", "PairConfig", "top-N x bottom-N preference pairs with HPO weights"),
    "train": ("dp2osr.train", "TrainConfig", "train the ControlNet: supervised (sft) or DP²O (dpo)"),
    "eval": ("dp2osr.evaluate", "EvalConfig", "IQA tables for SR folders; Best/Mean/Worst@M of pools"),
    "curve": ("dp2osr.curve", "CurveConfig", "held-out reward over a training run's checkpoints"),
    "report": ("dp2osr.report", "ReportConfig", "one self-contained HTML page of results"),
    "quickstart": ("dp2osr.quickstart", "QuickstartConfig", "the whole DP²O loop on the embedded model"),
    "demo": ("dp2osr.demo", "DemoConfig", "a local web page to try a model on photos (the demo extra)"),
}

# Commands whose first bare argument is an option: `dp2osr upscale photo.png` = `--input photo.png`.
POSITIONAL = {"upscale": ("input", "PHOTO_OR_FOLDER")}

DESCRIPTION = """\
dp2osr — DP²O-SR (Direct Perceptual Preference Optimization for Real-World Image Super-Resolution).

Stages, in pipeline order: degrade -> sample -> score -> pair -> train -> curve / eval -> report.
`upscale` runs a trained model on your images. Every command takes --config FILE.yaml (flags override it)
and saves its resolved config beside its output. `dp2osr COMMAND --help` lists every option.
"""


def _available() -> dict[str, Spec]:
    """Commands whose module exists in this installation."""
    out = {}
    for name, spec in COMMANDS.items():
        if importlib.util.find_spec(spec[0]) is not None:
            out[name] = spec
    return out


def build_parser(wanted: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, Spec]]:
    """The parser of every available command; only `wanted`'s options are added (its module imported)."""
    parser = argparse.ArgumentParser(
        prog="dp2osr", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = _available()
    for name, (module, cls_name, help_text) in commands.items():
        usage = None
        if name in POSITIONAL:  # the documented form first (argparse would list every option instead)
            flag, meta = POSITIONAL[name]
            usage = f"%(prog)s {meta} [options]\n       %(prog)s --{flag} {meta} [options]"
        p = sub.add_parser(name, help=help_text, description=help_text, usage=usage)
        # Only the chosen command's module is imported (torch/diffusers imports cost seconds).
        if name == wanted:
            cls = getattr(importlib.import_module(module), cls_name)
            add_arguments(p, cls)
            if cls.__doc__:
                p.description = inspect.cleandoc(cls.__doc__)
                p.formatter_class = argparse.RawDescriptionHelpFormatter
            if p.usage is None and has_nested(cls):  # a composing command: hundreds of flags, listed below
                p.usage = "%(prog)s [options] [--STAGE.OPTION VALUE ...]"
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    # A copy: the positional rewrite below leaves the caller's list and sys.argv as they are.
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in POSITIONAL and not argv[1].startswith("-"):
        argv.insert(1, "--" + POSITIONAL[argv[0]][0])
    parser, commands = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in POSITIONAL and POSITIONAL[args.command][0] not in vars(args) and args.config is None:
        name, meta = POSITIONAL[args.command]
        print(
            f"dp2osr {args.command}: error: nothing to do; call it as `dp2osr {args.command} {meta} [options]` "
            f"(or --{name} {meta}); `dp2osr {args.command} --help` lists the options",
            file=sys.stderr,
        )
        return 2
    module, cls_name, _ = commands[args.command]
    mod = importlib.import_module(module)
    try:
        cfg = build_config(getattr(mod, cls_name), args)
        mod.run(cfg)
    except StageError as exc:
        print(f"dp2osr {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, FileNotFoundError) as exc:
        print(f"dp2osr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only file system, a permission taken away during the run
        print(f"dp2osr {args.command}: error: {io_error(exc)}; {KEPT}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dp2osr {args.command}: interrupted; {KEPT}", file=sys.stderr)
        return 130
    finally:
        _close_distributed()
    return 0


KEPT = "finished outputs are kept, rerun to resume"


def io_error(exc: OSError) -> str:
    """An I/O error in one line: what happened and to which file(s)."""
    text = str(exc).strip()
    what = exc.strerror or (text.splitlines()[0] if text else type(exc).__name__)
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what} ({', '.join(files)})" if files else what


def _close_distributed() -> None:
    """Under torchrun / accelerate launch, take the process group down before the interpreter exits: left to
    the exit, a CPU (gloo) process can abort after finishing its work ("terminate called without an active
    exception", exit code -6), which fails the whole launch."""
    dist = sys.modules.get("torch.distributed")  # never imported by a command: nothing to close
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
