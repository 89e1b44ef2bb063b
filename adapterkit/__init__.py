"""adapterkit: QLoRA SFT, reward, DPO and PPO adapters on one 4-bit base.

The Python API runs the same code as the ``adapterkit`` commands::

    import adapterkit as ak

    config = ak.load_config("sft", "tiny_sft", ["train.max_steps=20"])   # adapterkit sft tiny_sft ...
    record = ak.train("sft", config)                                     # -> AdapterRecord
    print(record.path, record.metrics["train_loss"])

    registry = ak.Registry.open("adapters")                              # adapterkit publish ...
    registry.publish(record.path, name="my-sft", domain="flip")
    stack = ak.load_stack(["my-sft"], registry=registry)                 # base + adapters, checked
    print(ak.generate("my-sft", ["flip: hot up"], registry=registry))    # adapterkit generate ...

- ``__version__``: the installed package's version.
- ``load_config(stage, recipe=None, overrides=())``: a recipe (a YAML file or a shipped name,
  see ``adapterkit recipes --explain``) plus dotted overrides, validated.
- ``train(stage, config, overrides=())``: train one stage; ``config`` is a loaded config or a
  recipe; returns the saved adapter's ``AdapterRecord`` (path, manifest, metrics).
- ``Registry``: a registry root (``Registry.open(root)``): publish, get, list, profiles.
- ``load_stack(refs, registry=None)``: one base with registry adapters stacked on it, after
  checking base fingerprint, chat template and target modules (``LoadedStack``).
- ``generate(source, prompts, ...)``: greedy answers from a profile or adapter ref, or from a
  ``LoadedStack``.
- ``plan(recipe_or_config, overrides=(), gpu=None, ...)``: the predicted peak GPU memory of a
  stage from the base's config.json alone (``adapterkit plan``; ``memory.Plan``).

Heavy modules (torch, transformers, trl) load only when one of these is first used.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("adapterkit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from adapterkit.config import StageConfig
    from adapterkit.stages.common import AdapterRecord

# public name -> module that defines it (imported on first use)
_LAZY = {"load_config": "adapterkit.config", "Registry": "adapterkit.registry",
         "load_stack": "adapterkit.stack", "LoadedStack": "adapterkit.stack",
         "AdapterRecord": "adapterkit.stages.common", "AdapterkitError": "adapterkit.errors",
         "plan": "adapterkit.memory"}

__all__ = ["__version__", "train", "generate", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def train(stage: str, config: "StageConfig | str | None" = None, overrides: list[str] = ()) -> "AdapterRecord":
    """Train one stage (``sft``, ``reward``, ``dpo``, ``ppo``) as ``adapterkit <stage>`` does:
    preflight checks, setup, training, evaluation, the saved artifact.

    ``config`` is a config from ``load_config``, or a recipe (file or shipped name) that is
    loaded with ``overrides``. Returns the ``AdapterRecord`` of the saved adapter.

    Example::

        record = ak.train("sft", "tiny_sft", ["train.max_steps=20", "output.dir=runs/api-sft"])
        record = ak.train("dpo", ak.load_config("dpo", "tiny_dpo", ["dpo.parent=[runs/api-sft]"]))
    """
    from adapterkit.config import StageConfig, load_config
    from adapterkit.stages import train_stage
    if not isinstance(config, StageConfig):
        config = load_config(stage, config, list(overrides))
    elif overrides:
        raise TypeError("overrides go with a recipe; a loaded config already has its values")
    return train_stage(stage, config)


def generate(source, prompts: list, registry=None, max_new_tokens: int = 16, force: bool = False) -> list[str]:
    """Greedy answers to ``prompts`` (text, or chats as lists of messages).

    ``source`` is a profile name or an adapter ref in ``registry`` (as ``adapterkit generate
    --profile/--adapter``), or a ``LoadedStack`` from ``load_stack`` (every adapter on it active).

    Example::

        ak.generate("flip", ["flip: hot up"], registry=ak.Registry.open("runs/quickstart/adapters"))
        stack = ak.load_stack(["tiny-sft"], registry=registry)
        ak.generate(stack, ["flip: hot up"])
    """
    from adapterkit.stack import LoadedStack
    if isinstance(source, LoadedStack):
        from adapterkit.adapters import activate
        from adapterkit.evaluate import generate as greedy
        from adapterkit.tokens import as_chat
        activate(source.model, source.names)
        return greedy(source.model, source.tokenizer, [as_chat(source.tokenizer, p) for p in prompts],
                      max_new_tokens)
    from adapterkit.serve import serve_profile
    return serve_profile(source, list(prompts), registry, max_new_tokens, force=force)
