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
    p.add_argument("--overwrite", action="store_true", help="replace output.dir even when it holds "
                   "something other than this adapter (output.overwrite=true)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--publish", metavar="NAME", help="publish the trained adapter to the registry as NAME")
    p.add_argument("--domain", help="the adapter's domain (output.domain)")
    p.add_argument("--registry", metavar="DIR", help="registry root for --publish (default: "
                   "$ADAPTERKIT_REGISTRY, else ./adapters)")


def _train(stage: str, args) -> None:
    from adapterkit.config import load_config
    from adapterkit.stages import train_stage
    flags = {"output.publish": args.publish, "output.domain": args.domain, "output.registry": args.registry,
             "output.overwrite": "true" if args.overwrite else None}
    overrides = [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    config = load_config(stage, args.recipe, overrides)
    record = train_stage(stage, config)
    if args.json:
        _print_json({"adapter": str(record.path), "metrics": record.metrics})
    else:
        _console().print(f"[green]saved[/] {stage} adapter to {record.path}")
        for k, v in record.metrics.items():
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


# -- tiny --------------------------------------------------------------------------------

def _run_tiny(args) -> None:
    from adapterkit.tiny import ensure_tiny
    out = ensure_tiny(args.out, refresh=args.refresh, overwrite=args.overwrite)
    if args.json:
        _print_json({"dir": str(out), "base": str(out / "base"), "data": str(out / "data")})
    else:
        print(f"tiny default in {out}\n  base: {out / 'base'}\n  data: {out / 'data'}")


@command("tiny", "build (or refresh) the embedded tiny base, tokenizer and task", _run_tiny)
def _tiny_args(p):
    p.add_argument("--out", help="also write a copy here (base/ and data/); the cache lives in $ADAPTERKIT_HOME")
    p.add_argument("--refresh", action="store_true", help="rebuild the cache (and the copy)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds something "
                   "other than a tiny build")
    p.add_argument("--json", action="store_true")


@command("sft", "train a QLoRA SFT adapter from a recipe", lambda args: _train("sft", args))
def _sft_args(p):
    _add_recipe(p)


@command("reward", "train a reward model (LoRA + scalar head) on preference pairs",
         lambda args: _train("reward", args))
def _reward_args(p):
    _add_recipe(p)


@command("dpo", "train a DPO adapter on top of a frozen parent stack (the recipe names it)",
         lambda args: _train("dpo", args))
def _dpo_args(p):
    _add_recipe(p)


def _run_score(args) -> None:
    from adapterkit.stages.reward import score_file
    result = score_file(args.reward, args.data, registry=args.registry)
    if args.json:
        _print_json(result)
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


@command("ppo", "train a PPO policy adapter on a frozen parent stack, with reward and value "
         "adapters on the same 4-bit base", lambda args: _train("ppo", args))
def _ppo_args(p):
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
    if args.quiet:  # also transformers' "Loading weights" bars
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
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
    if summary.get("profile"):
        print(f"registry {summary['registry']}, profile {summary['profile']}:")
        print("\n".join("  " + line for line in summary["registry_tree"]))
    print(f"seconds per step: {summary['seconds']}; summary: {os.path.join(args.out, 'summary.json')}")


@command("quickstart", "build the tiny default and run every stage on it, then print the scores",
         _run_quickstart)
def _quickstart_args(p):
    p.add_argument("--out", default="runs/quickstart", help="folder for every artifact (default: runs/quickstart)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")


# -- registry, profiles, merge, export, generate --------------------------------------------

def _add_registry(p) -> None:
    p.add_argument("--registry", metavar="DIR",
                   help="registry root (default: $ADAPTERKIT_REGISTRY, else ./adapters)")


def _open_registry(args, create: bool = False):
    """The registry the command names; only ``publish`` (``create``) may use one not made yet."""
    from adapterkit.registry import Registry
    reg = Registry.open(args.registry)
    return reg if create else reg.require()


def _registry_list(args) -> None:
    entries = _open_registry(args).list(domain=args.domain, stage=args.stage, base=args.base,
                                        tag=args.tag, latest=args.latest)
    if args.json:
        _print_json([e.to_dict() for e in entries])
        return
    from rich.table import Table
    table = Table()
    for col in ("ref", "stage", "domain", "base", "tags", "published"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.ref, e.stage or "-", e.domain or "-", e.base_id or "-", ", ".join(e.tags), e.published_at)
    _console().print(table)


def _registry_show(args) -> None:
    from adapterkit.registry import tree_lines
    reg = _open_registry(args)
    entry, tree = reg.get(args.ref), reg.lineage(args.ref)
    if args.json:
        _print_json({**entry.to_dict(manifest=True), "lineage": tree})
        return
    for key in ("ref", "stage", "domain", "base_id", "tags", "published_at", "path"):
        print(f"{key:13s} {entry.to_dict()[key]}")
    print("lineage (each adapter above the parents it was trained on):")
    print("\n".join("  " + line for line in tree_lines(tree)))


def _registry_verify(args) -> None:
    from adapterkit.errors import IntegrityError
    reg = _open_registry(args)
    results = {reg.get(args.ref).ref: None} if args.ref else reg.verify_all()
    if args.ref:
        reg.verify(args.ref)
    for ref, problem in results.items():
        print(f"{ref}: {'ok' if problem is None else 'FAILED - ' + problem}")
    failed = [r for r, problem in results.items() if problem]
    if failed:
        raise IntegrityError(f"{len(failed)} of {len(results)} entries failed verification: {', '.join(failed)}")


def _registry_remove(args) -> None:
    reg = _open_registry(args)
    for ref in reg.remove(args.ref):
        print(f"removed {ref}")
    name = args.ref.partition("@")[0]
    users = reg.profiles_using(name)
    if users:
        print(f"warning: these profiles name {name}: {', '.join(users)}", file=sys.stderr)


def _registry_gc(args) -> None:
    removed = _open_registry(args).gc(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print("\n".join(f"{verb} {p}" for p in removed) or "nothing to remove")


REGISTRY_ACTIONS = {"list": _registry_list, "show": _registry_show, "verify": _registry_verify,
                    "remove": _registry_remove, "gc": _registry_gc}


@command("registry", "list, show, verify, remove and garbage-collect registry entries",
         lambda args: REGISTRY_ACTIONS[args.action](args))
def _registry_args(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="entries, filtered")
    for flag in ("domain", "stage", "base", "tag"):
        ls.add_argument(f"--{flag}", help=f"only entries with this {flag}" + (" fingerprint id" if flag == "base" else ""))
    ls.add_argument("--latest", action="store_true", help="only each name's newest version")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one entry and its lineage tree")
    show.add_argument("ref", help="name, name@3 or name@latest")
    show.add_argument("--json", action="store_true")
    verify = sub.add_parser("verify", help="sha256 of every file against the manifest")
    verify.add_argument("ref", nargs="?", help="one entry (default: all)")
    remove = sub.add_parser("remove", help="remove name@N, or every version with name@all")
    remove.add_argument("ref")
    gc = sub.add_parser("gc", help="delete what interrupted publishes left behind (only the registry's own folders)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    for q in (ls, show, verify, remove, sub.choices["gc"]):
        _add_registry(q)


def _run_publish(args) -> None:
    entry = _open_registry(args, create=True).publish(args.dir, name=args.name, domain=args.domain, tags=args.tag)
    if args.json:
        _print_json(entry.to_dict())
    else:
        print(f"published {entry.ref} ({entry.stage}, domain {entry.domain}) at {entry.path}")


@command("publish", "copy a trained adapter directory into the registry as a new version", _run_publish)
def _publish_args(p):
    p.add_argument("dir", help="a trained adapter directory (with adapterkit.json)")
    p.add_argument("--name", help="registry name (default: the manifest's name)")
    p.add_argument("--domain", help="domain (default: the manifest's)")
    p.add_argument("--tag", action="append", default=[], help="a tag; repeat for several")
    p.add_argument("--json", action="store_true")
    _add_registry(p)


def _run_profile(args) -> None:
    reg = _open_registry(args)
    if args.action == "set":
        from adapterkit.compose import set_profile
        profile = set_profile(reg, args.name, args.stack, args.mode, args.method, args.domain, args.force)
        print(f"profile {profile.name} ({profile.domain}): {' + '.join(profile.stack)} [{profile.mode}]")
        return
    profiles = [reg.profile(args.name)] if args.action == "show" else reg.profiles()
    if args.json:
        _print_json([p.to_dict() for p in profiles] if args.action == "list" else profiles[0].to_dict())
        return
    for p in profiles:
        method = f", method {p.method}" if p.mode == "merge" else ""
        print(f"{p.name} ({p.domain}): {' + '.join(p.stack)} [{p.mode}{method}]")


@command("profile", "set, show and list domain profiles (an ordered stack + a serving mode)", _run_profile)
def _profile_args(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("set", help="create or replace a profile")
    s.add_argument("name")
    s.add_argument("stack", nargs="+", metavar="REF", help="registry refs, bottom of the stack first")
    s.add_argument("--mode", default="stack", choices=("stack", "merge", "export"))
    s.add_argument("--method", default="cat", help="merge method for mode merge (default: cat, exact)")
    s.add_argument("--domain", help="default: the top adapter's domain")
    s.add_argument("--force", action="store_true", help="allow adapters trained on different bases")
    show = sub.add_parser("show")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    ls = sub.add_parser("list")
    ls.add_argument("--json", action="store_true")
    for q in (s, show, ls):
        _add_registry(q)


def _run_merge(args) -> None:
    from adapterkit.compose import MergeSpec, merge_profile
    spec = MergeSpec(args.method or "cat", density=args.density, mixed_ranks=args.mixed_ranks)
    report = merge_profile(args.profile, args.out, args.method, _open_registry(args), spec,
                           force=args.force, publish=args.publish, overwrite=args.overwrite)
    if args.json:
        _print_json(report.to_dict())
        return
    print(f"merged {args.profile} with {report.method} ({report.note}) into {report.out}")
    print(f"  vs the stacked adapters on {report.prompts} held-out prompts: max logit diff "
          f"{report.max_logit_diff:.3g}, mean {report.mean_logit_diff:.3g}" + (" (exact)" if report.exact else ""))


@command("merge", "merge a profile's stack into one adapter and report what it cost", _run_merge)
def _merge_args(p):
    p.add_argument("profile")
    p.add_argument("--method", help="cat (exact), linear, ties, dare_linear, dare_ties, svd "
                                    "(default: the profile's)")
    p.add_argument("--out", required=True, help="folder for the merged adapter")
    p.add_argument("--mixed-ranks", default="pad", choices=("pad", "svd"),
                   help="linear/ties/dare on adapters of different ranks: zero-pad, or peft's svd variant")
    p.add_argument("--density", type=float, default=0.7, help="ties/dare: fraction of entries kept")
    p.add_argument("--publish", metavar="NAME", help="also publish the merged adapter under NAME")
    p.add_argument("--force", action="store_true", help="load adapters trained on another base")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds something else")
    p.add_argument("--json", action="store_true")
    _add_registry(p)


def _run_export(args) -> None:
    from adapterkit.compose import export_profile
    report = export_profile(args.profile, args.out, args.dtype, _open_registry(args), force=args.force,
                            overwrite=args.overwrite)
    if args.json:
        _print_json(report.to_dict())
        return
    print(f"exported {args.profile} as a full {report.dtype} model to {report.out}")
    print(f"  vs the stacked adapters on {report.prompts} held-out prompts: max logit diff "
          f"{report.max_logit_diff:.3g}, mean {report.mean_logit_diff:.3g}")


@command("export", "merge a profile into a dequantized copy of its base; save a full model", _run_export)
def _export_args(p):
    p.add_argument("profile")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--force", action="store_true", help="load adapters trained on another base")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds something else")
    p.add_argument("--json", action="store_true")
    _add_registry(p)


def _run_generate(args) -> None:
    from adapterkit.compose import generate
    key = args.profile or args.adapter
    if key is None:
        raise AdapterkitError("generate: give --profile NAME or --adapter REF")
    answers = generate(key, args.prompts, _open_registry(args), args.max_new_tokens, force=args.force)
    if args.json:
        _print_json([{"prompt": p, "response": r} for p, r in zip(args.prompts, answers)])
        return
    for prompt, answer in zip(args.prompts, answers):
        print(f"> {prompt}\n{answer}")


@command("generate", "answer prompts with a profile (or one adapter) from the registry", _run_generate)
def _generate_args(p):
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--profile", help="a profile name")
    p.add_argument("--adapter", help="a registry ref instead of a profile")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--force", action="store_true", help="load adapters trained on another base")
    p.add_argument("--json", action="store_true")
    _add_registry(p)


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


def one_line(err: Exception) -> str:
    """The message on one line (a config error lists its keys; YAML errors span lines)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


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
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
