"""``adapterkit pipeline``: parsing and printing only (the work: ``pipeline.py``); registered in
``cli.COMMANDS``. ``print_summary`` prints a pipeline's (and the quickstart's) result."""
from __future__ import annotations

import os

from adapterkit.cli import command, console, print_json, stage_table


def print_summary(summary: dict, title: str) -> None:
    """The stage table, the registry and profile, the plots and the time per step."""
    con = console()
    con.print(stage_table(summary["stages"], title))
    if summary.get("profile"):
        print(f"registry {summary['registry']}, profile {summary['profile']}:")
        print("\n".join("  " + line for line in summary["registry_tree"]))
    if summary.get("plots"):
        print("plots:\n" + "\n".join(f"  {os.path.relpath(p)}" for p in summary["plots"]))
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
    print(f"time per step: {seconds}")


def _run_pipeline(args) -> None:
    from adapterkit.pipeline import run_pipeline
    from adapterkit.pipeline_config import explain, load_pipeline
    if args.explain:
        print("\n".join(explain()))
        return
    if args.recipe is None:
        from adapterkit.errors import ConfigError
        raise ConfigError("pipeline: name a pipeline recipe (a YAML file, or tiny_pipeline)")
    config = load_pipeline(args.recipe, [*args.overrides, *(["progress=false"] if args.quiet else [])])
    con = console()
    summary = run_pipeline(config, on_step=None if args.json else lambda s, h: con.rule(f"{s}: {h}"))
    if args.json:
        print_json(summary)
        return
    print_summary(summary, f"adapterkit pipeline {args.recipe} - {os.path.relpath(config.out)}")
    print(f"summary: {os.path.join(os.path.relpath(config.out), 'summary.json')}")


@command("pipeline", "run a pipeline recipe's stages in order (SFT -> reward -> DPO/PPO -> publish -> "
         "profile), each wired to the earlier ones; stages with the same inputs are reused", _run_pipeline)
def _pipeline_args(p):
    p.add_argument("recipe", nargs="?", help="a pipeline recipe YAML file, or tiny_pipeline")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides of the pipeline recipe, e.g. out=runs/x save_steps=20 "
                        "'overrides=[train.max_steps=10]' (a list replaces the recipe's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (progress=false)")
    p.add_argument("--json", action="store_true", help="print summary.json (one JSON document) instead of the table")
    p.add_argument("--explain", action="store_true", help="every key of a pipeline recipe, its default and meaning")
