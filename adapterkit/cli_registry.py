"""``adapterkit`` subcommands on the registry: list/show/verify/remove/gc, publish, profiles,
merge, export and generate. Parsing and printing only; registered in ``cli.COMMANDS``."""
from __future__ import annotations

import sys

from adapterkit.cli import command, console, print_json
from adapterkit.errors import AdapterkitError


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
        print_json([e.to_dict() for e in entries])
        return
    from rich.table import Table
    table = Table()
    for col in ("ref", "stage", "domain", "base", "tags", "published"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.ref, e.stage or "-", e.domain or "-", e.base_id or "-", ", ".join(e.tags), e.published_at)
    console().print(table)


def _registry_show(args) -> None:
    from adapterkit.lineage import lineage, tree_lines
    reg = _open_registry(args)
    entry, tree = reg.get(args.ref), lineage(reg, args.ref)
    if args.json:
        print_json({**entry.to_dict(manifest=True), "lineage": tree})
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
    from adapterkit.profiles import profiles_using
    users = profiles_using(reg, name)
    if users:
        print(f"warning: these profiles name {name}: {', '.join(users)}", file=sys.stderr)


def _registry_gc(args) -> None:
    from adapterkit.registry_gc import gc
    removed = gc(_open_registry(args), dry_run=args.dry_run)
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
    entry = _open_registry(args, create=True).publish(args.dir, name=args.name, domain=args.domain, tags=args.tag,
                                                      parents=args.parent)
    if args.json:
        print_json(entry.to_dict())
        return
    print(f"published {entry.ref} ({entry.stage}, domain {entry.domain}) at {entry.path}")
    for p in entry.parent:
        print(f"  trained on top of {p.get('registry_ref') or p.get('name') + ' (not in this registry)'}")


@command("publish", "copy a trained adapter directory into the registry as a new version", _run_publish)
def _publish_args(p):
    p.add_argument("dir", help="a trained adapter directory (with adapterkit.json)")
    p.add_argument("--name", help="registry name (default: the manifest's name)")
    p.add_argument("--domain", help="domain (default: the manifest's)")
    p.add_argument("--tag", action="append", default=[], help="a tag; repeat for several")
    p.add_argument("--parent", action="append", metavar="REF", help="the registry entry each recorded parent "
                   "is (bottom first; repeat), when its bytes are published under several names")
    p.add_argument("--json", action="store_true")
    _add_registry(p)


def _profile_line(p) -> str:
    method = f", method {p.method}" if p.mode == "merge" else ""
    return f"profile {p.name} ({p.domain}): {' + '.join(p.stack)} [{p.mode}{method}]"


def _run_profile(args) -> None:
    from adapterkit.profiles import get_profile, list_profiles, newer_versions, set_profile, update_profile
    reg = _open_registry(args)
    if args.action == "set":
        profile = set_profile(reg, args.name, args.stack, args.mode, args.method, args.domain, args.force, args.alone)
        print(_profile_line(profile))
        from adapterkit.lineage import stack_gaps
        for note in stack_gaps(reg, [reg.get(r) for r in profile.stack]):
            print(f"note: {note} (--alone)")
        return
    if args.action == "update":
        profile, moved = update_profile(reg, args.name)
        print("\n".join(f"moved {old} -> {new}" for old, new in moved.items()) or "already up to date")
        print(_profile_line(profile))
        return
    profiles = [get_profile(reg, args.name)] if args.action == "show" else list_profiles(reg)
    newer = {p.name: newer_versions(reg, p) for p in profiles}
    if args.json:
        dicts = [{**p.to_dict(), "newer": newer[p.name]} for p in profiles]
        print_json(dicts if args.action == "list" else dicts[0])
        return
    for p in profiles:
        print(_profile_line(p))
        for old, new in newer[p.name].items():
            print(f"  note: {new} is newer than {old}; `adapterkit profile update {p.name}` moves it")


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
    s.add_argument("--alone", action="store_true", help="keep exactly these layers, without the parents "
                   "they were trained on (default: each layer brings its recorded parents)")
    show = sub.add_parser("show", help="a profile, and newer versions of its layers")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    up = sub.add_parser("update", help="move a profile's layers to their newest versions, lineage checked")
    up.add_argument("name")
    ls = sub.add_parser("list")
    ls.add_argument("--json", action="store_true")
    for q in (s, show, up, ls):
        _add_registry(q)


def _run_merge(args) -> None:
    from adapterkit.merge import MergeSpec, merge_profile
    spec = MergeSpec(args.method or "cat", density=args.density, mixed_ranks=args.mixed_ranks)
    report = merge_profile(args.profile, args.out, args.method, _open_registry(args), spec, force=args.force,
                           publish=args.publish, overwrite=args.overwrite, prompts_file=args.prompts, alone=args.alone)
    if args.json:
        print_json(report.to_dict())
        return
    print(f"merged {args.profile} with {report.method} ({report.note}) into {report.out}")
    print(f"  vs the stacked adapters on {report.prompts} {report.prompt_source}: max logit diff "
          f"{report.max_logit_diff:.3g}, mean {report.mean_logit_diff:.3g}" + (" (exact)" if report.exact else ""))


def _add_serving(p) -> None:
    """The flags every command that serves a profile or an adapter ref shares."""
    p.add_argument("--alone", action="store_true", help="an adapter ref by itself, without the parents it "
                   "was trained on (default: with them)")
    p.add_argument("--force", action="store_true", help="load adapters trained on another base")
    _add_registry(p)


@command("merge", "merge a profile's stack into one adapter and report what it cost", _run_merge)
def _merge_args(p):
    p.add_argument("profile", help="a profile, or an adapter ref (served with its parents)")
    p.add_argument("--method", help="cat (exact), linear, ties, dare_linear, dare_ties, svd "
                                    "(default: the profile's)")
    p.add_argument("--out", required=True, help="folder for the merged adapter")
    p.add_argument("--mixed-ranks", default="pad", choices=("pad", "svd"),
                   help="linear/ties/dare on adapters of different ranks: zero-pad, or peft's svd variant")
    p.add_argument("--density", type=float, default=0.7, help="ties/dare: fraction of entries kept")
    p.add_argument("--publish", metavar="NAME", help="also publish the merged adapter under NAME")
    _add_measure(p)


def _run_export(args) -> None:
    from adapterkit.export import export_profile
    report = export_profile(args.profile, args.out, args.dtype, _open_registry(args), force=args.force,
                            overwrite=args.overwrite, prompts_file=args.prompts, alone=args.alone)
    if args.json:
        print_json(report.to_dict())
        return
    print(f"exported {args.profile} as a full {report.dtype} model to {report.out}")
    print(f"  vs the stacked adapters on {report.prompts} {report.prompt_source}: max logit diff "
          f"{report.max_logit_diff:.3g}, mean {report.mean_logit_diff:.3g}")


def _add_measure(p) -> None:
    p.add_argument("--prompts", metavar="FILE", help="measure the result on the prompts of this data file "
                   "(default: the adapters' recorded held-out data)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds something else")
    p.add_argument("--json", action="store_true")
    _add_serving(p)


@command("export", "merge a profile into a dequantized copy of its base; save a full model", _run_export)
def _export_args(p):
    p.add_argument("profile", help="a profile, or an adapter ref (served with its parents)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _add_measure(p)


def _run_generate(args) -> None:
    from adapterkit.serve import serve_profile
    key = args.profile or args.adapter
    if key is None:
        raise AdapterkitError("generate: give --profile NAME or --adapter REF")
    from adapterkit.profiles import resolve_key
    reg = _open_registry(args)
    refs, _, notes = resolve_key(reg, key, args.alone)
    answers = serve_profile(key, args.prompts, reg, args.max_new_tokens, force=args.force, alone=args.alone)
    print(f"served by {' + '.join(refs)}", file=sys.stderr)  # after: a refusal stays one line
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json([{"prompt": p, "response": r} for p, r in zip(args.prompts, answers)])
        return
    for prompt, answer in zip(args.prompts, answers):
        print(f"> {prompt}\n{answer}")


@command("generate", "answer prompts with a profile (or one adapter) from the registry", _run_generate)
def _generate_args(p):
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--profile", help="a profile name")
    p.add_argument("--adapter", help="a registry ref instead of a profile (served with the parents it "
                   "was trained on, unless --alone)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    _add_serving(p)
