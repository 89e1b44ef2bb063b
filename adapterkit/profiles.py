"""Domain profiles: a named, ordered stack of exact registry versions and how to serve it
(``stack``, ``merge`` with one of ``merge.METHODS``, or ``export``). Profiles live in the
registry's index beside its entries.

A stack is resolved once, when the profile is set: ``@latest`` becomes the version it is now,
and every layer brings the parents it was trained on (``lineage.expand_stack``), so publishing
``legal-sft@2`` never changes what ``legal`` serves; ``update_profile`` moves it, checked.

    set_profile(reg, "legal", ["legal-dpo"])   # -> legal-sft@1 + legal-dpo@1
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from adapterkit.errors import CompatibilityError, RegistryError
from adapterkit.lineage import expand_stack, serving_stack, stack_gaps
from adapterkit.refs import parse_ref, validate_name
from adapterkit.registry import Entry, Registry, now

MODES = ("stack", "merge", "export")


@dataclass
class Profile:
    """A named serving recipe for a domain: an ordered stack of refs and a mode."""
    name: str
    domain: str
    stack: list[str]
    mode: str = "stack"  # stack | merge | export
    method: str = "cat"  # the merge method when mode is merge
    updated_at: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def set_profile(registry: Registry, name: str, stack: list[str], mode: str = "stack", method: str = "cat",
                domain: str | None = None, force: bool = False, alone: bool = False) -> Profile:
    """Create or replace a profile; the merge method must be known, every ref must resolve, and
    all on one base unless ``force``. Each layer is pinned to its exact version and brings its
    recorded parents (a missing one is refused, named); ``alone`` keeps exactly ``stack``."""
    from adapterkit.merge import METHODS
    if method not in METHODS:
        raise RegistryError(f"profile {name!r}: unknown merge method {method!r}; known: {', '.join(METHODS)}")
    validate_name(name)
    if mode not in MODES:
        raise RegistryError(f"profile {name!r}: mode {mode!r} is not one of {', '.join(MODES)}")
    if not stack:
        raise RegistryError(f"profile {name!r}: the stack is empty; name at least one adapter")
    entries = [_entry(registry, name, ref) for ref in stack]
    if not alone:
        try:
            entries = expand_stack(registry, [e.ref for e in entries])
        except (RegistryError, CompatibilityError) as err:
            raise type(err)(f"profile {name!r}: {err}") from None
    bases = {e.base_id for e in entries}
    if len(bases) > 1 and not force:
        detail = ", ".join(f"{e.ref} on {e.base_id}" for e in entries)
        raise CompatibilityError(f"profile {name!r}: its adapters were trained on different bases "
                                 f"({detail}); pass force to set it anyway")
    profile = Profile(name, domain or entries[-1].domain or name, [e.ref for e in entries], mode, method, now())
    with registry.transaction() as db:
        db.execute("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?, ?)",
                   (profile.name, profile.domain, json.dumps(profile.stack), profile.mode,
                    profile.method, profile.updated_at))
    return profile


def newer_versions(registry: Registry, profile: Profile) -> dict[str, str]:
    """Pinned layer -> the newest version of its name, for layers that have a newer one."""
    out = {}
    for ref in profile.stack:
        name, version = parse_ref(ref)
        latest = registry.list(name=name, latest=True)
        if latest and version is not None and latest[0].version > version:
            out[ref] = latest[0].ref
    return out


def update_profile(registry: Registry, name: str) -> tuple[Profile, dict[str, str]]:
    """Move every layer with a newer version to it, after checking that each layer's recorded
    parents are still the layers under it; returns the profile and {old: new}."""
    profile = get_profile(registry, name)
    moved = newer_versions(registry, profile)
    stack = [moved.get(ref, ref) for ref in profile.stack]
    try:
        expand_stack(registry, stack)
    except (RegistryError, CompatibilityError) as err:
        raise CompatibilityError(f"profile {name!r}: cannot move to {' + '.join(stack)}: {err}") from None
    if moved:
        profile = set_profile(registry, name, stack, profile.mode, profile.method, profile.domain, force=True)
    return profile, moved


def resolve_key(registry: Registry, key: str, alone: bool = False) -> tuple[list[str], Profile | None, list[str]]:
    """What ``generate``, ``merge`` and ``export`` serve for ``key``: (exact refs, the profile
    or None, notes). A profile gives its pinned stack; an adapter ref gives its serving stack
    (``alone``: the adapter by itself, which the notes say)."""
    try:
        profile = get_profile(registry, key)
    except RegistryError as no_profile:
        profile = None
        try:
            registry.get(key)
        except RegistryError as err:
            raise RegistryError(f"{no_profile}; {err}") from None
    if profile is not None:
        entries = profile_entries(registry, key)
        return [e.ref for e in entries], profile, stack_gaps(registry, entries)
    if alone:
        entry = registry.get(key)
        below = [r for r in _below(registry, entry.ref)]
        note = f"{entry.ref} served alone (--alone)" + (f", without {', '.join(below)}, which it was "
                                                         "trained on top of" if below else "")
        return [entry.ref], None, [note]
    return serving_stack(registry, key), None, []


def _below(registry: Registry, ref: str) -> list[str]:
    try:
        return serving_stack(registry, ref)[:-1]
    except RegistryError:
        return [str(p.get("ref") or p.get("name")) for p in registry.get(ref).parent]


def _entry(registry: Registry, profile: str, ref: str) -> Entry:
    try:
        return registry.get(ref)
    except RegistryError as err:
        raise RegistryError(f"profile {profile!r} names {ref!r}, which is not in the registry: {err}") from None


def get_profile(registry: Registry, name: str) -> Profile:
    with registry.connect() as db:
        row = db.execute("SELECT * FROM profiles WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = [r[0] for r in db.execute("SELECT name FROM profiles ORDER BY name")]
            raise RegistryError(f"no profile named {name!r} in the registry {registry.root} "
                                f"(profiles: {', '.join(known) or 'none'})")
    return Profile(row["name"], row["domain"], json.loads(row["stack"]), row["mode"], row["method"],
                   row["updated_at"])


def list_profiles(registry: Registry) -> list[Profile]:
    with registry.connect() as db:
        rows = db.execute("SELECT name FROM profiles ORDER BY name").fetchall()
    return [get_profile(registry, r[0]) for r in rows]


def profile_entries(registry: Registry, name: str) -> list[Entry]:
    """The profile's stack resolved now; an adapter removed since fails, named."""
    return [_entry(registry, name, ref) for ref in get_profile(registry, name).stack]


def remove_profile(registry: Registry, name: str) -> None:
    get_profile(registry, name)
    with registry.transaction() as db:
        db.execute("DELETE FROM profiles WHERE name = ?", (name,))


def profiles_using(registry: Registry, name: str) -> list[str]:
    """Profiles whose stack names ``name`` (any version)."""
    return [p.name for p in list_profiles(registry) if any(parse_ref(r)[0] == name for r in p.stack)]
