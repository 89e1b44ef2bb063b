"""Lineage of registry entries: the parent stack each adapter was trained on, as a tree, and
the stack a policy is served with. Reads the registry; writes nothing."""
from __future__ import annotations

from adapterkit.registry import Entry, Registry


def parent_entries(registry: Registry, entry: Entry) -> list[Entry | dict]:
    """The entry's parent stack, each as a registry entry when found (by weights sha256,
    then by name@version), else as the manifest's record (a dict)."""
    out = []
    for record in entry.parent:
        found = registry.find_parent(record)
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
    """The refs a policy entry is served with: its published parents, bottom first, then
    itself (a ``continue``-mode adapter replaces its last parent)."""
    entry = registry.get(ref)
    parents = [p.ref for p in parent_entries(registry, entry) if isinstance(p, Entry)]
    recipe = entry.manifest.get("recipe") or {}
    if (recipe.get(entry.stage or "") or {}).get("mode") == "continue":
        parents = parents[:-1]
    return [*parents, entry.ref]


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
