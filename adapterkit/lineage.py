"""Lineage of registry entries: the parent stack each adapter was trained on, as a tree, and
the stack an entry is served with.

Lineage is recorded by identity, not found later by hash. A stage records each parent's
sha256, manifest name and, when it was a registry entry, its ``ref``. ``publish`` resolves
the records once (``resolve_parents``) and stores the answer in the entry's ``parent`` column
as ``registry_ref``: the same bytes published under two names keep two distinct lineages.
"""
from __future__ import annotations

from pathlib import Path

from adapterkit.errors import CompatibilityError, RegistryError
from adapterkit.registry import Entry, Registry


# -- resolving a parent record, once, at publish -------------------------------------------------

def _recorded(registry: Registry, record: dict) -> Entry | None:
    """The entry the record's ``ref`` names, when it is in this registry with the same bytes."""
    try:
        entry = registry.get(record["ref"]) if record.get("ref") else None
    except RegistryError:
        return None
    return entry if entry is not None and entry.weights_sha256 == record.get("sha256") else None


def match_parent(registry: Registry, record: dict, domain: str | None) -> tuple[Entry | None, list[Entry]]:
    """(the entry, []) when the record names one; (None, candidates) when it is ambiguous;
    (None, []) when it is not in the registry. Order: the recorded ref; the one entry with
    those bytes; among several, those of the recorded name, then of ``domain``; one name's
    versions of the same bytes are one adapter (the oldest is taken)."""
    found = _recorded(registry, record)
    if found is not None:
        return found, []
    candidates = registry.by_sha(record.get("sha256"))
    for keep in (lambda e: e.name == record.get("name"), lambda e: e.domain == domain):
        narrowed = [e for e in candidates if keep(e)]
        candidates = narrowed or candidates
        if len({e.name for e in candidates}) == 1:
            return candidates[0], []
    return None, candidates


def resolve_parents(registry: Registry, manifest: dict, domain: str, chosen: list[str] | None,
                    src: Path) -> list[dict]:
    """The manifest's parent records, each with ``registry_ref``: the entry it resolves to in
    this registry, or None when it is not published. Refuses an ambiguous parent (name it with
    ``--parent REF``) and a chosen ref whose bytes are not the recorded parent's."""
    records = [dict(r) for r in manifest.get("parent") or []]
    if chosen is not None and len(chosen) != len(records):
        raise RegistryError(f"{src}: {len(chosen)} --parent refs for {len(records)} recorded parents "
                            f"({', '.join(r.get('name') or '?' for r in records) or 'none'})")
    for i, record in enumerate(records):
        if chosen is not None:
            entry = registry.get(chosen[i])
            if entry.weights_sha256 != record.get("sha256"):
                raise RegistryError(f"{src}: --parent {chosen[i]} is not the parent it was trained on "
                                    f"({record.get('name')}, sha256 {str(record.get('sha256'))[:12]})")
        else:
            entry, candidates = match_parent(registry, record, domain)
            if candidates:
                raise RegistryError(
                    f"{src}: its parent {record.get('name')} (sha256 {str(record.get('sha256'))[:12]}) is "
                    f"published as {', '.join(e.ref for e in candidates)}; say which with --parent REF")
        record["registry_ref"] = entry.ref if entry is not None else None
    return records


# -- reading lineage ----------------------------------------------------------------------------

def parent_entries(registry: Registry, entry: Entry) -> list[Entry | dict]:
    """The entry's parent stack, bottom first, each as a registry entry when it resolves, else
    as the manifest's record (a dict). Read from ``registry_ref``; a parent published after
    its child (or an entry from before #12) is matched by the same rules, never guessed."""
    out = []
    for record in entry.parent:
        found = None
        if record.get("registry_ref"):
            try:
                found = registry.get(record["registry_ref"])
            except RegistryError:
                found = None  # removed since
        else:
            found = match_parent(registry, record, entry.domain)[0]
        out.append(found if found is not None else record)
    return out


def lineage(registry: Registry, ref: str, _seen: frozenset = frozenset()) -> dict:
    """{"ref", "stage", "domain", "base_id", "parents": [subtrees]}; unpublished parents
    appear with ``"ref": None`` and the name and path the manifest recorded."""
    entry = registry.get(ref)
    node = {"ref": entry.ref, "stage": entry.stage, "domain": entry.domain, "base_id": entry.base_id,
            "merged_from": [s["ref"] for s in (entry.manifest.get("merge") or {}).get("sources", [])],
            "parents": []}
    for p in parent_entries(registry, entry):
        if isinstance(p, Entry) and p.ref not in _seen:
            node["parents"].append(lineage(registry, p.ref, _seen | {entry.ref}))
        elif isinstance(p, dict):
            node["parents"].append({"ref": None, "name": p.get("name"), "path": p.get("path"),
                                    "parents": []})
    return node


def serving_stack(registry: Registry, ref: str) -> list[str]:
    """The exact refs an entry is served with: its recorded parents, bottom first, then itself
    (a ``continue``-mode adapter replaces its last parent). A parent missing from the registry
    is refused, named: the adapter alone is not what was trained (``--alone`` asks for it)."""
    entry = registry.get(ref)
    parents = parent_entries(registry, entry)
    missing = [p for p in parents if isinstance(p, dict)]
    if missing:
        p = missing[0]
        raise RegistryError(f"{entry.ref} was trained on top of {p.get('ref') or p.get('name')} (sha256 "
                            f"{str(p.get('sha256'))[:12]}), which is not in the registry {registry.root}; "
                            f"publish it, or serve {entry.ref} by itself with --alone")
    refs = [p.ref for p in parents]
    recipe = entry.manifest.get("recipe") or {}
    if (recipe.get(entry.stage or "") or {}).get("mode") == "continue":
        refs = refs[:-1]
    return [*refs, entry.ref]


def expand_stack(registry: Registry, refs: list[str]) -> list[Entry]:
    """Every layer with the parents it was trained on under it, exact versions, bottom first;
    refuses a stack holding another version of a layer's parent (it was not trained on that)."""
    out: list[Entry] = []
    for ref in refs:
        layer = registry.get(ref)
        for entry in map(registry.get, serving_stack(registry, layer.ref)):
            clash = [o.ref for o in out if o.name == entry.name and o.ref != entry.ref]
            if clash:
                raise CompatibilityError(f"{layer.ref} was trained on top of {entry.ref}, but the stack "
                                         f"holds {clash[0]}; use {entry.ref}, or a {layer.name} trained on {clash[0]}")
            if entry.ref not in [o.ref for o in out]:
                out.append(entry)
    return out


def stack_gaps(registry: Registry, entries: list[Entry]) -> list[str]:
    """Layers served without a parent they were trained on (set with ``--alone``, or before
    lineage was checked), one note each."""
    held, notes = {e.ref for e in entries}, []
    for e in entries:
        try:
            below = serving_stack(registry, e.ref)[:-1]
        except RegistryError as err:
            notes.append(str(err))
            continue
        lacking = [r for r in below if r not in held]
        if lacking:
            notes.append(f"{e.ref} is served without {', '.join(lacking)}, which it was trained on top of")
    return notes


def tree_lines(node: dict, prefix: str = "") -> list[str]:
    """A lineage tree as text lines (``show`` prints them)."""
    label = node["ref"] or f"{node.get('name')} (not in the registry: {node.get('path')})"
    extra = f"  [{node['stage']}, {node['domain']}, base {node['base_id']}]" if node["ref"] else ""
    if node.get("merged_from"):
        extra += f"  merged from {' + '.join(node['merged_from'])}"
    lines = [label + extra]
    kids = node["parents"]
    for i, kid in enumerate(kids):
        last = i == len(kids) - 1
        sub = tree_lines(kid)
        lines.append(("└── " if last else "├── ") + sub[0])
        lines += [("    " if last else "│   ") + s for s in sub[1:]]
    return lines
