"""Registry entries on one base: compatibility checks, then loading an exact stack.

    stack = load_stack(["tiny-sft@1", "tiny-dpo@2"])   # checked, verified, stacked
    logits = prompt_logits(stack.model, stack.tokenizer, prompts, stack.names)

Every check runs before anything is stacked: a base fingerprint other than the one an adapter
was trained on is refused (unless forced); a different chat template, quantization or set of
target modules is a warning. ``merge.py``, ``export.py`` and ``serve.py`` build on a
``LoadedStack`` and measure themselves against it (``prompt_logits``, ``logit_gap``).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adapterkit.adapters import activate, load_adapters
from adapterkit.base import check_base_on_disk, fingerprint, load_model, load_tokenizer, trained_base
from adapterkit.sections import BaseSection
from adapterkit.data import template_hash
from adapterkit.errors import AdapterkitError, CompatibilityError
from adapterkit.registry import Entry, Registry

if TYPE_CHECKING:
    from adapterkit.profiles import Profile
from adapterkit.tokens import as_chat, model_device, prompt_ids

log = logging.getLogger("adapterkit")

DEFAULT_PROMPTS = ["flip: hot up", "Write one sentence about the sea.", "What is 2 + 2?",
                   "Summarise: the meeting moved to Friday at noon."]


# -- compatibility, checked before anything is loaded, stacked or merged -------------------

def check_base(entry: Entry, fp: dict, section: BaseSection, force: bool) -> list[str]:
    """Refuse (unless ``force``) an adapter trained on another base fingerprint."""
    if entry.base_id == fp["id"]:
        return []
    trained = entry.manifest.get("base", {})
    msg = (f"{entry.ref} was trained on base {entry.base_id} ({trained.get('source')}), but the base "
           f"loaded now ({section.name}) has fingerprint {fp['id']}")
    if not force:
        raise CompatibilityError(msg + "; refusing to stack it. Use the base it was trained on, or "
                                       "force=True (--force) to load it anyway")
    return [msg + " (forced)"]


def check_template(entry: Entry, tokenizer) -> list[str]:
    trained, now = entry.manifest.get("chat_template_sha256"), template_hash(tokenizer)
    if trained == now:
        return []
    return [f"{entry.ref}: chat template differs: trained with sha256 {str(trained)[:12]}, the base "
            f"tokenizer's is {str(now)[:12]}; prompts will not look like its training data"]


def target_modules(entry: Entry) -> set[str] | None:
    config = json.loads((entry.path / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    return set(targets) if isinstance(targets, list) else None  # a regex string: not compared


def check_targets(entries: list[Entry], model) -> list[str]:
    """Target modules absent from the base (their weights would be silently ignored), and
    stacked adapters that adapt different modules (it matters for every merge but ``cat``)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    out, targets = [], {e.ref: target_modules(e) for e in entries}
    for ref, t in targets.items():
        if t and t - names:
            out.append(f"{ref}: targets modules this base does not have: {', '.join(sorted(t - names))}; "
                       "their weights would be ignored")
    known = {r: t for r, t in targets.items() if t is not None}
    if len({frozenset(t) for t in known.values()}) > 1:
        union = set().union(*known.values())
        parts = [f"{r} lacks {', '.join(sorted(union - t))}" for r, t in known.items() if union - t]
        out.append("the stacked adapters target different modules: " + "; ".join(parts))
    return out


def check_quantization(entry: Entry, section: BaseSection) -> list[str]:
    trained = entry.manifest.get("base", {}).get("quantization")
    if trained in (None, section.quantization):
        return []
    return [f"{entry.ref} was trained on a {trained} base, served now on {section.quantization}"]


# -- loading a stack ------------------------------------------------------------------------

@dataclass
class LoadedStack:
    """One base in memory with registry entries loaded on it as named adapters."""
    model: object  # peft.PeftModel, eval mode
    tokenizer: object
    section: BaseSection
    fingerprint: dict
    entries: list[Entry] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # adapter names in the model, as ``entries``
    warnings: list[str] = field(default_factory=list)


def adapter_name(entry: Entry) -> str:
    """``tiny-sft@2`` -> ``tiny-sft_v2`` (peft names become module keys: no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", entry.name) + f"_v{entry.version}"


def load_base_for(entry: Entry, base: BaseSection | None = None, device: str | None = None,
                  force: bool = False) -> LoadedStack:
    """The base ``entry`` was trained on (or ``base``), in eval mode; ``load_model`` already made
    its 4-bit layers compute like training's (see ``quant.keep_compute_dtype``). A local base
    whose weights are not the entry's base is refused before it loads (unless ``force``)."""
    section = base or trained_base(entry.manifest, entry.path)
    if not force:
        check_base_on_disk(section, (entry.manifest.get("base") or {}).get("fingerprint"), entry.ref)
    model, tokenizer = load_model(section, device), load_tokenizer(section)
    model.eval()
    return LoadedStack(model, tokenizer, section, fingerprint(model, tokenizer))


def add_entries(loaded: LoadedStack, registry: Registry, entries: list[Entry], force: bool = False) -> list[str]:
    """Verify, check and load entries not loaded yet; returns their adapter names, in order."""
    new = [e for e in entries if adapter_name(e) not in loaded.names]
    for e in new:
        registry.verify(e.ref)  # a tampered or truncated file fails here, named
    warnings = []
    for e in new:
        warnings += check_base(e, loaded.fingerprint, loaded.section, force)
        warnings += check_template(e, loaded.tokenizer) + check_quantization(e, loaded.section)
    warnings += check_targets(entries, loaded.model)
    for w in dict.fromkeys(warnings):
        if w not in loaded.warnings:
            log.warning(w)
            loaded.warnings.append(w)
    if new:
        loaded.model, _ = load_adapters(loaded.model, [e.path for e in new], [adapter_name(e) for e in new])
        loaded.model.eval()
        loaded.entries += new
        loaded.names += [adapter_name(e) for e in new]
    return [adapter_name(e) for e in entries]


def load_stack(refs: list[str], registry: Registry | None = None, base: BaseSection | None = None,
               force: bool = False, device: str | None = None) -> LoadedStack:
    """Resolve, verify and check ``refs``, then load them as a stack on their base."""
    registry = registry or Registry.open()
    entries = [registry.get(r) for r in refs]
    if not entries:
        raise AdapterkitError("nothing to load: the stack is empty")
    loaded = load_base_for(entries[0], base, device, force)
    add_entries(loaded, registry, entries, force)
    return loaded


def load_key(key: str, registry: Registry | None = None, base: BaseSection | None = None, force: bool = False,
             device: str | None = None, alone: bool = False) -> tuple[LoadedStack, Profile | None, list[str]]:
    """A profile's pinned stack, or an adapter ref with the parents it was trained on
    (``profiles.resolve_key``: the one way a served stack is built); (stack, profile, notes)."""
    from adapterkit.profiles import resolve_key
    registry = registry or Registry.open()
    refs, profile, notes = resolve_key(registry, key, alone)  # a missing layer or parent fails here, named
    for note in notes:
        log.warning(note)
    return load_stack(refs, registry, base, force, device), profile, notes


def load_profile(name: str, registry: Registry | None = None, base: BaseSection | None = None,
                 force: bool = False, device: str | None = None) -> tuple[LoadedStack, Profile]:
    from adapterkit.profiles import get_profile
    registry = registry or Registry.open()
    get_profile(registry, name)
    loaded, profile, _ = load_key(name, registry, base, force, device)
    return loaded, profile


# -- logits, and what a merge or an export costs --------------------------------------------

@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list, adapters: list[str] | None = None) -> list[torch.Tensor]:
    """One (T, V) fp32 logits tensor per prompt, unpadded, with ``adapters`` active."""
    if adapters is not None:
        activate(model, adapters)
    device = model_device(model)
    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, as_chat(tokenizer, p))], device=device)  # (1, T)
        out.append(model(input_ids=ids).logits[0].float().cpu())  # (T, V)
    return out


PROMPT_KEYS = (("data", "eval"), ("dpo", "prompts"), ("ppo", "prompts"))  # recipe keys of held-out data


def row_prompt(row: dict):
    """The prompt of a data row: ``prompt``, or a chat without its last assistant turn."""
    if "prompt" in row:
        return row["prompt"]
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) > 1 and messages[-1].get("role") == "assistant":
        return messages[:-1]
    return None


def read_prompts(source: str, n: int) -> list:
    from adapterkit.data import FORMATS, load_data
    rows = load_data(source, fmt="auto", allowed=tuple(FORMATS)).rows
    prompts = [p for p in map(row_prompt, rows) if p is not None]
    return [p for i, p in enumerate(prompts) if p not in prompts[:i]][:n]


def heldout_prompts(entries: list[Entry], prompts_file: str | None = None, n: int = 8) -> tuple[list, str]:
    """(prompts, where they came from) to measure a merge or an export on: a file the user
    names, else the held-out data the top-most adapter recorded (``data.eval``, ``dpo.prompts``),
    else ``DEFAULT_PROMPTS`` - and the source says which."""
    from adapterkit.artifact import recorded_path
    if prompts_file:
        return read_prompts(prompts_file, n) or _no_prompts(prompts_file), f"prompts from {prompts_file}"
    for entry in reversed(entries):
        recipe = entry.manifest.get("recipe") or {}
        for section, key in PROMPT_KEYS:
            value = (recipe.get(section) or {}).get(key)
            if not isinstance(value, str) or not value:
                continue
            try:
                prompts = read_prompts(recorded_path(entry.path, value), n)
            except AdapterkitError as err:
                log.warning("%s: its held-out data %s cannot be read (%s)", entry.ref, value, err)
                continue
            if prompts:
                return prompts, f"held-out prompts from {entry.ref}'s {section}.{key} ({value})"
    return DEFAULT_PROMPTS, "generic prompts (no held-out data recorded; --prompts FILE names some)"


def _no_prompts(source: str):
    raise AdapterkitError(f"{source}: no prompts in it (rows need a 'prompt', or 'messages' ending "
                          "with an assistant turn)")


def logit_gap(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """Max and mean absolute logit difference over every prompt position and vocab entry."""
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, other)])
    return {"max_logit_diff": diffs.max().item(), "mean_logit_diff": diffs.mean().item()}


