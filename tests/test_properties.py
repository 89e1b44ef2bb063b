"""Property-based tests (hypothesis): the override parser, the name/ref parser, the data
validators and the manifest path guard, on inputs nobody would think to write by hand."""
from __future__ import annotations

import string

import pytest
from hypothesis import given, settings, strategies as st

from adapterkit.config import apply_overrides
from adapterkit.data import FORMATS, validate_rows
from adapterkit.errors import AdapterkitError, ConfigError, DataError, UnsafePathError
from adapterkit.errors import RegistryError
from adapterkit.refs import parse_ref, validate_name
from adapterkit.safety import member

settings.register_profile("ci", max_examples=150, deadline=None)
settings.load_profile("ci")

KEY = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
# "s..." is never one of YAML's keywords (yes, no, on, off, null), which parse as bool/None
SCALAR = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                   st.text(string.ascii_letters, max_size=8).map(lambda t: "s" + t))


@given(st.lists(KEY, min_size=1, max_size=3), SCALAR)
def test_override_round_trips_a_scalar(path, value):
    text = str(value).lower() if isinstance(value, bool) else str(value)
    out = apply_overrides({}, [".".join(path) + "=" + text])
    node = out
    for part in path[:-1]:
        node = node[part]
    assert node[path[-1]] == value


@given(st.text(max_size=40))
def test_override_parser_only_ever_raises_config_error(item):
    try:
        apply_overrides({"lora": {"r": 8}, "x": 1}, [item])
    except ConfigError:
        pass


@given(st.text(max_size=40))
def test_names_never_escape_the_registry(name):
    try:
        validate_name(name)
    except RegistryError:
        return
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True).filter(lambda n: ".." not in n),
       st.integers(1, 10**6))
def test_ref_parser_round_trips(name, version):
    assert parse_ref(f"{name}@{version}") == (name, version)
    assert parse_ref(f"{name}@v{version}") == (name, version)
    assert parse_ref(name) == parse_ref(f"{name}@latest") == (name, None)


@given(st.text(max_size=30))
def test_ref_parser_only_ever_raises_registry_error(ref):
    try:
        parse_ref(ref)
    except RegistryError:
        pass


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.sampled_from(
                                                   ["role", "content", "prompt", "chosen", "rejected",
                                                    "messages", "completion", "text"]), inner, max_size=4)),
                       max_leaves=10)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@given(rows=st.lists(JSONISH, min_size=1, max_size=3))
def test_validators_raise_only_data_errors_naming_the_row(fmt, rows):
    try:
        validate_rows(rows, fmt, "f.jsonl", tuple(FORMATS))
    except DataError as err:
        assert str(err).startswith("f.jsonl, row ")


@given(st.text(max_size=30))
def test_manifest_paths_stay_inside(tmp_path_factory, name):
    folder = tmp_path_factory.getbasetemp() / "adapter"
    try:
        path = member(folder, name)
    except UnsafePathError:
        return
    assert path.parent == folder and path.name == name and name not in (".", "..")


def test_member_refuses_the_classics(tmp_path):
    for bad in ["../x", "/etc/passwd", "a/b", "..", ".", "", "a\\..\\b", "x\x00y"]:
        with pytest.raises(AdapterkitError):
            member(tmp_path, bad)
