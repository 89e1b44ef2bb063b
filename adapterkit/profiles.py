"""Domain profiles: a named, ordered stack of registry refs and how to serve it (``stack``,
``merge`` with one of ``merge.METHODS``, or ``export``). Profiles live in the registry's
index beside its entries; every ref is checked when a profile is set and again when used.

    set_profile(reg, "legal", ["legal-sft@1", "legal-dpo"], mode="merge", method="ties")
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from adapterkit.errors import CompatibilityError, RegistryError
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
                domain: str | None = None, force: bool = False) -> Profile:
    """Create or replace a profile; the merge method must be known, every ref must resolve, and
    all on one base unless ``force``."""
    from adapterkit.merge import METHODS
    if method not in METHODS:
        raise RegistryError(f"profile {name!r}: unknown merge method {method!r}; known: {', '.join(METHODS)}")
    validate_name(name)
    if mode not in MODES:
        raise RegistryError(f"profile {name!r}: mode {mode!r} is not one of {', '.join(MODES)}")
    if not stack:
        raise RegistryError(f"profile {name!r}: the stack is empty; name at least one adapter")
    entries = [_entry(registry, name, ref) for ref in stack]
    bases = {e.base_id for e in entries}
    if len(bases) > 1 and not force:
        detail = ", ".join(f"{e.ref} on {e.base_id}" for e in entries)
        raise CompatibilityError(f"profile {name!r}: its adapters were trained on different bases "
                                 f"({detail}); pass force to set it anyway")
    profile = Profile(name, domain or entries[-1].domain or name, [str(r) for r in stack], mode,
                      method, now())
    with registry.transaction() as db:
        db.execute("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?, ?)",
                   (profile.name, profile.domain, json.dumps(profile.stack), profile.mode,
                    profile.method, profile.updated_at))
    return profile


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
