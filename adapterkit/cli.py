"""``adapterkit`` subcommands: parsing and printing only; the work lives in the library.

Each subcommand is one ``(add_arguments, run)`` pair in ``COMMANDS``. Errors that are the
user's to fix (AdapterkitError) print as one message on stderr, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Callable, TextIO

from adapterkit.errors import AdapterkitError

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help_: str, run: Callable):
    """Register the decorated ``add_arguments(parser)`` and ``run(args)`` under ``name``."""
    def deco(add_arguments):
        COMMANDS[name] = (help_, add_arguments, run)
        return add_arguments
    return deco


def console():
    from rich.console import Console
    return Console()


_JSON_OUT: list[TextIO] = []  # the real stdout while a --json command runs (``main``)


def print_json(obj) -> None:
    """The one JSON document of a ``--json`` command. While the command runs, anything else
    printed (a library's log line) goes to stderr, so stdout parses as JSON."""
    print(json.dumps(obj, indent=2, default=str), file=_JSON_OUT[-1] if _JSON_OUT else sys.stdout)


def _add_recipe(p) -> None:
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped one (see `adapterkit recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides, e.g. train.learning_rate=1e-4 lora.r=16")
    p.add_argument("--overwrite", action="store_true", help="replace output.dir even when it holds "
                   "something other than this adapter (output.overwrite=true)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout "
                   "(progress and messages go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (train.progress=false)")
    p.add_argument("--publish", metavar="NAME", help="publish the trained adapter to the registry as NAME")
    p.add_argument("--domain", help="the adapter's domain (output.domain)")
    p.add_argument("--registry", metavar="DIR", help="registry root for --publish (default: "
                   "$ADAPTERKIT_REGISTRY, else ./adapters)")


def _train(stage: str, args) -> None:
    from adapterkit.config import load_config
    from adapterkit.stages import train_stage
    flags = {"output.publish": args.publish, "output.domain": args.domain, "output.registry": args.registry,
             "output.overwrite": "true" if args.overwrite else None,
             "train.progress": "false" if args.quiet else None}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    config = load_config(stage, args.recipe, overrides)
    record = train_stage(stage, config)
    from adapterkit.distributed import is_main
    if not is_main():  # under `accelerate launch`: the main process reports, once
        return
    if args.json:
        print_json({"adapter": str(record.path), "metrics": record.metrics})
    else:
        console().print(f"[green]saved[/] {stage} adapter to {record.path}")
        for k, v in record.metrics.items():
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


# -- tiny --------------------------------------------------------------------------------

def _run_tiny(args) -> None:
    from adapterkit.tiny import ensure_tiny
    out = ensure_tiny(args.out, refresh=args.refresh, overwrite=args.overwrite)
    if args.json:
        print_json({"dir": str(out), "base": str(out / "base"), "data": str(out / "data")})
    else:
        print(f"tiny default in {out}\n  base: {out / 'base'}\n  data: {out / 'data'}")


@command("tiny", "build (or refresh) the embedded tiny base, tokenizer and task", _run_tiny)
def _tiny_args(p):
    p.add_argument("--out", help="also write a copy here (base/ and data/); the cache lives in $ADAPTERKIT_HOME")
    p.add_argument("--refresh", action="store_true", help="rebuild the cache (and the copy)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds something "
                   "other than a tiny build")
    p.add_argument("--json", action="store_true")


def _register_stages() -> None:
    """One training command per stage config (``config.STAGE_CONFIGS``: the one stage list)."""
    from functools import partial
    from adapterkit.config import STAGE_CONFIGS
    for stage, cls in STAGE_CONFIGS.items():
        command(stage, " ".join(cls.__doc__.split()), partial(_train, stage))(_add_recipe)


_register_stages()


def _run_accelerate(args) -> None:
    from adapterkit.distributed import launch_config, launch_configs
    if args.name:
        path = str(launch_config(args.name))
        if args.json:
            print_json({"name": args.name, "path": path})
        else:
            print(path)
        return
    configs = launch_configs()
    if args.json:
        print_json({name: {"path": str(path), "about": about} for name, (about, path) in configs.items()})
        return
    for name, (about, _) in configs.items():
        print(f"  {name:16s} {about}")
    print("accelerate launch --config_file \"$(adapterkit accelerate NAME)\" [--num_processes N] -m adapterkit <stage> RECIPE")


@command("accelerate", "the shipped `accelerate launch` configs (single GPU, DDP, FSDP + QLoRA, DeepSpeed "
         "ZeRO-2/3): list them, or print one's path", _run_accelerate)
def _accelerate_args(p):
    p.add_argument("name", nargs="?", help="print this config's path (for accelerate launch --config_file)")
    p.add_argument("--json", action="store_true")


def _run_score(args) -> None:
    from adapterkit.scorer import score_file
    result = score_file(args.reward, args.data, registry=args.registry)
    if args.json:
        print_json(result)
        return
    pairs = result["format"] == "preference"
    n = len(result["chosen"] if pairs else result["scores"])
    for i in range(min(n, args.rows)):
        print(f"  row {i + 1}: " + (f"chosen {result['chosen'][i]:.4f}  rejected {result['rejected'][i]:.4f}"
                                    if pairs else f"{result['scores'][i]:.4f}"))
    if n > args.rows:
        print(f"  ... {n - args.rows} more rows (--json for all)")
    summary = (f"accuracy {result['accuracy']:.4f}, mean margin {result['margin']:.4f}" if pairs
               else f"mean reward {result['mean']:.4f}")
    print(f"{args.data}: {summary}")


@command("score", "score responses with a reward adapter (pairs: accuracy and margin)", _run_score)
def _score_args(p):
    p.add_argument("--reward", required=True, metavar="NAME_OR_DIR",
                   help="a reward adapter directory, or a registry name (name, name@3)")
    p.add_argument("data", help="a file of preference pairs, prompt/completion rows or chats")
    p.add_argument("--registry", metavar="DIR", help="registry root for a name (default: "
                   "$ADAPTERKIT_REGISTRY, else ./adapters)")
    p.add_argument("--rows", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", action="store_true", help="every score and the summary as JSON")


def _run_recipes(args) -> None:
    from adapterkit.config import STAGE_CONFIGS, explain, recipe_path, shipped_recipes
    if args.explain:
        for stage in ([args.explain] if args.explain != "all" else STAGE_CONFIGS):
            if stage not in STAGE_CONFIGS:
                raise AdapterkitError(f"recipes --explain {stage}: no such stage ({', '.join(STAGE_CONFIGS)})")
            print(f"# {stage}: {' '.join(STAGE_CONFIGS[stage].__doc__.split())}")
            print("\n".join(explain(stage)))
        return
    for name in shipped_recipes():
        first = recipe_path(name).read_text().splitlines()[0]
        print(f"{name:20s} {first.lstrip('# ')}")


@command("recipes", "list the recipes shipped with adapterkit; --explain: every recipe key", _run_recipes)
def _recipes_args(p):
    p.add_argument("--explain", nargs="?", const="all", metavar="STAGE",
                   help="every key of a stage's recipes (default: every stage), its type, default and meaning")


# -- quickstart --------------------------------------------------------------------------

def _run_quickstart(args) -> None:
    from adapterkit.cli_pipeline import print_summary
    from adapterkit.quickstart import run_quickstart
    con = console()
    summary = run_quickstart(args.out, progress=not args.quiet,
                             on_step=None if args.json else lambda s, h: con.rule(f"{s}: {h}"))
    if args.json:
        print_json(summary)
        return
    print_summary(summary, f"adapterkit quickstart (held-out prompts, ground-truth scorer) - {args.out}")
    print(f"summary: {os.path.join(args.out, 'summary.json')}")


LABELS = {"kl": "held-out KL", "eval_loss": "eval loss", "accuracy": "pair accuracy", "win_rate": "win rate"}


def stage_table(stages: dict, title: str):
    """One row per stage: its score, the change against its parent's score, a red mark and a
    one-line reason where the stage made things worse (``quickstart.regression``)."""
    from rich.table import Table
    from adapterkit.quickstart import change, regression
    table = Table(title=title)
    for col in ("stage", "adapter", "score", "vs parent", "other"):
        table.add_column(col)
    for stage, entry in stages.items():
        other = ", ".join(f"{LABELS.get(k, k)}={v:.3f}" for k, v in entry.items()
                          if k not in ("adapter", "score", "parent") and isinstance(v, float))
        score, delta, worse = entry.get("score"), change(stages, stage), regression(stages, stage)
        vs = "-" if delta is None else f"{delta:+.3f} vs {entry['parent']}"
        adapter = os.path.relpath(entry["adapter"]) + " (reused)" * bool(entry.get("reused")) if entry.get("adapter") else "-"
        table.add_row(stage, adapter,
                      f"{score:.3f}" if score is not None else "-",
                      f"[red]{vs}  worse: {worse}[/]" if worse else vs, other)
    return table


@command("quickstart", "build the tiny default and run every stage on it, then print the scores",
         _run_quickstart)
def _quickstart_args(p):
    p.add_argument("--out", default="runs/quickstart", help="folder for every artifact (default: runs/quickstart)")
    p.add_argument("--quiet", action="store_true", help="no progress bars: only the step headers and the table")
    p.add_argument("--json", action="store_true", help="print summary.json (one JSON document) instead of the table")


# -- registry, profiles, merge, export, generate: cli_registry.py ------------------------------

from adapterkit import cli_pipeline, cli_registry, cli_frontier, cli_plan  # noqa: E402, F401  (register their commands here, in this order)


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
    """Without ``-v``: no library warnings, info logs or loading bars ("Loading weights");
    adapterkit's own progress bar per stage stays."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()


def one_line(err: Exception) -> str:
    """The message on one line (a config error lists its keys; YAML errors span lines)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    from adapterkit.distributed import quiet_rank
    args = build_parser().parse_args(argv)
    quiet = quiet_rank()  # under `accelerate launch`, every process but the first logs errors only
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if quiet or not args.verbose:
        _quiet_libraries()
    json_out = getattr(args, "json", False)
    try:
        with contextlib.ExitStack() as stack:
            if json_out:  # stdout is the JSON document's alone: anything else goes to stderr
                _JSON_OUT.append(sys.stdout)
                stack.callback(_JSON_OUT.pop)
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            args.func(args)
    except AdapterkitError as err:
        if args.verbose:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
