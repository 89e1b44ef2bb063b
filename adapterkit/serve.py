"""Serve profiles (or single adapter refs) from one base in memory, rows of one batch on
different profiles (peft's mixed-adapter batches).

    Server().generate(prompts, ["legal", "support", "legal"])   # one batch, many profiles
    serve_profile("legal", prompts)                             # one profile
"""
from __future__ import annotations

import re

import torch

from adapterkit.adapters import activate
from adapterkit.sections import BaseSection
from adapterkit.errors import AdapterkitError
from adapterkit.evaluate import generate
from adapterkit.merge import METHODS, MergeSpec
from adapterkit.profiles import resolve_key
from adapterkit.registry import Registry
from adapterkit.stack import LoadedStack, add_entries, load_base_for
from adapterkit.tokens import as_chat


class Server:
    """One base in memory serving profiles (or single adapter refs) row by row.

    A row on its own is served as its profile says (a stack: every adapter on at once). In
    a mixed batch each row names ONE adapter (peft's ``adapter_names=``), so a stacked profile
    is served there by its exact ``cat`` merge, built once and kept. A ``merge`` profile is
    served by its merge method; an ``export`` profile by its stack, which its fp32 export
    reproduces (the exported model itself loads with transformers, outside this server)."""

    def __init__(self, registry: Registry | None = None, base: BaseSection | None = None,
                 force: bool = False, device: str | None = None, alone: bool = False):
        self.registry = registry or Registry.open()
        self.base, self.force, self.device, self.alone = base, force, device, alone
        self.notes: list[str] = []  # what differs from the recorded stack (``--alone``, gaps)
        self.loaded: LoadedStack | None = None
        self.stacks: dict[str, list[str]] = {}  # key -> adapter names served alone
        self.single: dict[str, str] = {}  # key -> one adapter name for mixed batches

    def add(self, key: str) -> list[str]:
        """Load a profile (or, when no profile has that name, an adapter ref with the parents it
        was trained on; with ``alone``, the adapter by itself)."""
        if key in self.stacks:
            return self.stacks[key]
        refs, profile, notes = resolve_key(self.registry, key, self.alone)
        self.notes += notes
        entries = [self.registry.get(r) for r in refs]
        if self.loaded is None:
            self.loaded = load_base_for(entries[0], self.base, self.device, self.force)
        names = add_entries(self.loaded, self.registry, entries, self.force)
        if profile is not None and profile.mode == "merge" and len(names) > 1:
            names = [self._merge(key, names, profile.method)]
        self.stacks[key] = names
        return names

    def _merge(self, key: str, names: list[str], method: str) -> str:
        out = f"p_{re.sub(r'[^A-Za-z0-9_-]', '_', key)}_{method}"
        if out not in self.loaded.model.peft_config:
            METHODS[method].merge(self.loaded.model, names, MergeSpec(method), out)
        return out

    def adapter_for_row(self, key: str | None) -> str:
        if key is None:
            return "__base__"
        names = self.add(key)
        if len(names) == 1:
            return names[0]
        if key not in self.single:
            self.single[key] = self._merge(key, names, "cat")
        return self.single[key]

    @torch.no_grad()
    def generate(self, prompts: list, keys: list[str | None], max_new_tokens: int = 16,
                 batch_size: int = 8) -> list[str]:
        """Greedy answers; row i uses profile or adapter ``keys[i]`` (None: the bare base)."""
        if len(prompts) != len(keys):
            raise AdapterkitError(f"{len(prompts)} prompts but {len(keys)} profiles; give one per row")
        for k in dict.fromkeys(k for k in keys if k is not None):
            self.add(k)
        if self.loaded is None:
            raise AdapterkitError("no profile or adapter to serve")
        out = []
        for i in range(0, len(prompts), batch_size):
            out += self._batch(prompts[i:i + batch_size], keys[i:i + batch_size], max_new_tokens)
        return out

    def _batch(self, prompts: list, keys: list, max_new_tokens: int) -> list[str]:
        model, tok = self.loaded.model, self.loaded.tokenizer
        prompts = [as_chat(tok, p) for p in prompts]
        if len(set(keys)) == 1 and keys[0] is not None:  # one profile: served as it says
            activate(model, self.stacks[keys[0]])
            return generate(model, tok, prompts, max_new_tokens, batch_size=len(prompts))
        rows = [self.adapter_for_row(k) for k in keys]
        return generate(model, tok, prompts, max_new_tokens, batch_size=len(prompts), adapter_names=rows)


def serve_profile(profile: str, prompts: list, registry: Registry | None = None, max_new_tokens: int = 16,
                  force: bool = False, alone: bool = False) -> list[str]:
    """Greedy answers to ``prompts`` from one profile (or adapter ref, with its parents unless
    ``alone``)."""
    return Server(registry, force=force, alone=alone).generate(prompts, [profile] * len(prompts), max_new_tokens)
