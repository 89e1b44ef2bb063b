"""Registry names and references: ``name``, ``name@3``, ``name@v3``, ``name@latest``. A name is
one path component, so an entry always stays inside its registry's directory."""
from __future__ import annotations

import re

from adapterkit.errors import RegistryError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def validate_name(name: str) -> str:
    """A registry name is one path component: letters, digits, ``. _ + -``; no ``..``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise RegistryError(
            f"invalid adapter name {name!r}: use letters, digits and . _ + - (starting with a "
            "letter or digit, no '..', no '/'), so that it stays inside the registry directory")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` / ``name@latest`` -> (name, None); ``name@3`` or ``name@v3`` -> (name, 3)."""
    name, sep, version = str(ref).partition("@")
    validate_name(name)
    if not sep or version == "latest":
        return name, None
    digits = version[1:] if version[:1] in ("v", "V") else version
    if not digits.isdigit() or int(digits) < 1:
        raise RegistryError(f"{ref!r}: a version is a number >= 1 or 'latest' (name@3, name@latest)")
    return name, int(digits)
