"""Named bases, data schemes and reward functions: how ``base.name: tiny``, ``data.train:
tiny:sft`` or ``dpo.scorer: tiny`` become a path or a ``module:function``. The embedded tiny
default plugs in here exactly as a user's own source would, so the core (``base.py``,
``data.py``, ``rewards.py``) knows no particular task:

    resolvers.register_base("mybase", lambda name: "/models/mybase")   # base.name: mybase
    resolvers.register_data("corp", lambda ref: corp_export(ref[5:]))  # data.train: corp:q3
    resolvers.register_reward("exact", "corp.scoring:exact_match")     # ppo.scorer: exact

``tiny.py`` registers ``tiny`` (a base and a reward function) and ``tiny:<split>`` (data);
modules in ``BUILTIN`` are imported the first time a name or scheme is not found, so nothing
heavy loads before then.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Callable

BASES: dict[str, Callable[[str], str | Path]] = {}  # exact base name -> its directory
DATA: dict[str, Callable[[str], str | Path]] = {}   # scheme (before ":") -> the data's path
REWARDS: dict[str, str] = {}  # short name -> "module:function" (see rewards.py)
BUILTIN = ("adapterkit.tiny",)
_loaded = False


def register_base(name: str, resolve: Callable[[str], str | Path]) -> None:
    BASES[name] = resolve


def register_data(scheme: str, resolve: Callable[[str], str | Path]) -> None:
    DATA[scheme] = resolve


def register_reward(name: str, target: str) -> None:
    REWARDS[name] = target


def _lookup(table: dict, key: str):
    global _loaded
    if key not in table and not _loaded:
        _loaded = True
        for module in BUILTIN:
            import_module(module)
    return table.get(key)


def resolve_base_name(name: str) -> str | None:
    """The directory a registered base name stands for, or None when it is not one."""
    resolve = _lookup(BASES, name) if "/" not in name else None
    return None if resolve is None else str(resolve(name))


def resolve_data(source: str) -> str:
    """``scheme:rest`` through its registered resolver; anything else is returned as it is."""
    scheme, sep, _ = source.partition(":")
    resolve = _lookup(DATA, scheme) if sep and scheme.isidentifier() else None
    return source if resolve is None else str(resolve(source))


def reward_target(name: str) -> str | None:
    """The ``module:function`` a registered reward-function name stands for, or None."""
    return _lookup(REWARDS, name)


def task_of(value) -> str | None:
    """The registered task a reference belongs to: the scheme of a data reference
    (``tiny:prompts_eval`` -> ``tiny``), or a reward name that is also a data scheme
    (``tiny``); None for a file, a ``module:function`` or anything else."""
    if not isinstance(value, str):
        return None
    scheme, sep, _ = value.partition(":")
    name = scheme if sep else value
    if not name.isidentifier() or _lookup(DATA, name) is None:
        return None
    return name if sep or _lookup(REWARDS, name) is not None else None
