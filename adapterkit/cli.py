"""``adapterkit`` subcommands: parsing and printing only; the work lives in the library.

Each subcommand is one ``(add_arguments, run)`` pair in ``COMMANDS``. Errors that are the
user's to fix (AdapterkitError) print as one message on stderr, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from adapterkit.errors import AdapterkitError

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help_: str, run: Callable):
    """Register the decorated ``add_arguments(parser)`` and ``run(args)`` under ``name``."""
    def deco(add_arguments):
        COMMANDS[name] = (help_, add_arguments, run)
        return add_arguments
    return deco


def _console():
    from rich.console import Console
    return Console()


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_recipe(p) -> None:
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped one (see `adapterkit recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides, e.g. train.learning_rate=1e-4 lora.r=16")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _train(stage: str, args) -> None:
    from adapterkit.config import load_config
    from adapterkit.stages import STAGES
    config = load_config(stage, args.recipe, args.overrides)
    record = STAGES[stage](config)
    if args.json:
        _print_json({"adapter": str(record.path), "metrics": record.metrics})
    else:
        _console().print(f"[green]saved[/] {stage} adapter to {record.path}")
        for k, v in record.metrics.items():
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


# -- tiny --------------------------------------------------------------------------------

def _run_tiny(args) -> None:
    from adapterkit.tiny import ensure_tiny
    out = ensure_tiny(args.out, refresh=args.refresh or args.out is not None)
    if args.json:
        _print_json({"dir": str(out), "base": str(out / "base"), "data": str(out / "data")})
    else:
        print(f"tiny default in {out}\n  base: {out / 'base'}\n  data: {out / 'data'}")


@command("tiny", "build (or refresh) the embedded tiny base, tokenizer and task", _run_tiny)
def _tiny_args(p):
    p.add_argument("--out", help="write here instead of the cache ($ADAPTERKIT_HOME)")
    p.add_argument("--refresh", action="store_true", help="rebuild the cached copy")
    p.add_argument("--json", action="store_true")


@command("sft", "train a QLoRA SFT adapter from a recipe", lambda args: _train("sft", args))
def _sft_args(p):
    _add_recipe(p)


def _run_recipes(args) -> None:
    from adapterkit.config import recipe_path, shipped_recipes
    for name in shipped_recipes():
        first = recipe_path(name).read_text().splitlines()[0]
        print(f"{name:20s} {first.lstrip('# ')}")


@command("recipes", "list the recipes shipped with adapterkit", _run_recipes)
def _recipes_args(p):
    pass


# -- quickstart --------------------------------------------------------------------------

def _run_quickstart(args) -> None:
    from adapterkit.quickstart import run_quickstart
    console = _console()
    summary = run_quickstart(args.out, progress=not args.quiet,
                             on_step=None if args.json else lambda s: console.rule(f"step: {s}"))
    if args.json:
        _print_json(summary)
        return
    from rich.table import Table
    table = Table(title=f"adapterkit quickstart (held-out prompts, ground-truth scorer) - {args.out}")
    for col in ("stage", "adapter", "score", "other"):
        table.add_column(col)
    for stage, entry in summary["stages"].items():
        other = ", ".join(f"{k}={v:.3f}" for k, v in entry.items()
                          if k not in ("adapter", "score") and isinstance(v, float))
        score = entry.get("score")
        table.add_row(stage, os.path.relpath(entry["adapter"]) if entry.get("adapter") else "-",
                      f"{score:.3f}" if score is not None else "-", other)
    console.print(table)
    print(f"seconds per step: {summary['seconds']}; summary: {os.path.join(args.out, 'summary.json')}")


@command("quickstart", "build the tiny default and run every stage on it, then print the scores",
         _run_quickstart)
def _quickstart_args(p):
    p.add_argument("--out", default="runs/quickstart", help="folder for every artifact (default: runs/quickstart)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterkit",
        description="QLoRA SFT, reward, DPO and PPO adapters on one 4-bit base, offline by default.")
    parser.add_argument("-v", "--verbose", action="store_true", help="library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    import datasets
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        args.func(args)
    except AdapterkitError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
