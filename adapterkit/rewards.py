"""Reward functions: plain Python callables that score completions, with trl's GRPO
reward-function signature, ``fn(prompts, completions, **kwargs) -> list[float]``.

- ``prompts`` are as the data holds them: text, or a conversation (a list of messages);
- ``completions`` follow the prompt's format: text, or ``[{"role": "assistant", "content": ...}]``.

A recipe names one as ``module:function`` (imported from the user's environment, or from the
working directory as ``python -m`` would: the user asked for that code by naming it) or by a
short name registered in ``resolvers.py`` (``tiny``). They serve as PPO's reward
(``ppo.reward``, instead of a reward adapter) and as the ground-truth scorer of held-out
prompts (``ppo.scorer``, ``dpo.scorer``). In Python the callable itself may be given.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

from adapterkit.errors import ConfigError
from adapterkit.resolvers import REWARDS, reward_target  # noqa: F401  (REWARDS: the registered names)

RewardFunction = Callable[..., list]

_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def is_function_ref(ref: Any) -> bool:
    """A callable, a registered name, or a ``module:function`` string (not a path)."""
    return callable(ref) or (isinstance(ref, str) and (bool(_REF.fullmatch(ref))
                                                       or reward_target(ref) is not None))


def describe(ref: Any) -> str:
    """How a reference is written in a config or manifest."""
    if callable(ref):
        return f"{getattr(ref, '__module__', '?')}:{getattr(ref, '__qualname__', repr(ref))}"
    return str(ref)


def load_function(ref: str | RewardFunction) -> RewardFunction:
    """The callable a reference names."""
    if callable(ref):
        return ref
    target = reward_target(ref) or ref
    module_name, _, attr = target.partition(":")
    try:
        obj = _import(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward function {ref!r}: cannot import {target} ({err}; the module must be "
                          "installed, on PYTHONPATH or in the working directory)") from None
    if not callable(obj):
        raise ConfigError(f"reward function {ref!r}: {target} is not callable")
    return obj


def _import(module_name: str):
    """``import_module``, and where the module is not found, again with the working directory on
    ``sys.path`` (appended, so installed packages still win): the ``adapterkit`` console script,
    unlike ``python -m``, does not put it there, and a user's ``my_rewards.py`` lives there."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def completion_like(prompt, text: str):
    """A generated text in the prompt's format: a one-message assistant turn for a conversation."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def score_completions(fn: RewardFunction, prompts: list, texts: list[str]) -> list[float]:
    """Call ``fn`` on generated texts; one finite float per prompt, or a clear error (an
    exception inside ``fn`` too: its type and message, the traceback with ``adapterkit -v``)."""
    try:
        out = fn(prompts=list(prompts), completions=[completion_like(p, t) for p, t in zip(prompts, texts)])
    except Exception as err:  # the user's code: any exception, named as theirs
        raise ConfigError(f"reward function {describe(fn)} raised {type(err).__name__}: {err} "
                          "(adapterkit -v shows the traceback)") from err
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise ConfigError(f"reward function {describe(fn)}: must return a list of numbers, got "
                          f"{type(out).__name__}") from None
    if len(values) != len(prompts) or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"reward function {describe(fn)}: returned {len(values)} values for "
                          f"{len(prompts)} completions, or a value that is not finite")
    return values


@dataclass
class FunctionScorer:
    """A reward function behind the interface of ``scorer.RewardScorer`` (``score(prompts,
    responses)``), so a stage scores with either without asking which it holds."""
    fn: RewardFunction

    @classmethod
    def load(cls, ref: str | RewardFunction) -> "FunctionScorer":
        return cls(load_function(ref))

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return score_completions(self.fn, prompts, responses)
