"""Compose registry entries on one base: check, stack, merge (a registry of methods), export,
and serve batches whose rows use different profiles.

    loaded = load_stack(["tiny-sft@1", "tiny-dpo@2"])         # checked, verified, stacked
    report = merge_loaded(loaded, MergeSpec("cat"))            # exact: max logit diff ~1e-6
    export_loaded(loaded, "exports/flip", dtype="float32")   # full model, dequantized base
    Server().generate(prompts, ["legal", "support", "legal"])  # one batch, many profiles

Every merge and export measures itself against the stacked adapters (max and mean absolute
logit difference on a few held-out prompts), so the user sees what it cost.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from adapterkit import quant
from adapterkit.artifact import atomic_dir, seal, write_artifact
from adapterkit.base import (check_base_on_disk, fingerprint, load_adapters, load_model, load_tokenizer,
                             resolve_base, save_adapter, trained_base)
from adapterkit.config import BaseSection
from adapterkit.data import template_hash
from adapterkit.errors import AdapterkitError, CompatibilityError
from adapterkit.evaluate import prompt_ids
from adapterkit.registry import Entry, Profile, Registry, RegistryError
from adapterkit.safety import check_output_dir
from adapterkit.tokens import left_pad, model_device

log = logging.getLogger("adapterkit")

DEFAULT_PROMPTS = ["flip: hot up", "Write one sentence about the sea.", "What is 2 + 2?",
                   "Summarise: the meeting moved to Friday at noon."]


# -- compatibility, checked before anything is loaded, stacked or merged -------------------

def base_section(manifest: dict) -> BaseSection:
    """The base an adapter was trained on (``base.trained_base``: trust_remote_code forced off)."""
    return trained_base(manifest)


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
class Loaded:
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
                  force: bool = False) -> Loaded:
    """The base ``entry`` was trained on (or ``base``), in eval mode; ``load_model`` already made
    its 4-bit layers compute like training's (see ``quant.keep_compute_dtype``). A local base
    whose weights are not the entry's base is refused before it loads (unless ``force``)."""
    section = base or base_section(entry.manifest)
    if not force:
        check_base_on_disk(section, (entry.manifest.get("base") or {}).get("fingerprint"), entry.ref)
    model, tokenizer = load_model(section, device), load_tokenizer(section)
    model.eval()
    return Loaded(model, tokenizer, section, fingerprint(model, tokenizer))


def add_entries(loaded: Loaded, registry: Registry, entries: list[Entry], force: bool = False) -> list[str]:
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
               force: bool = False, device: str | None = None) -> Loaded:
    """Resolve, verify and check ``refs``, then load them as a stack on their base."""
    registry = registry or Registry.open()
    entries = [registry.get(r) for r in refs]
    if not entries:
        raise AdapterkitError("nothing to load: the stack is empty")
    loaded = load_base_for(entries[0], base, device, force)
    add_entries(loaded, registry, entries, force)
    return loaded


def load_profile(name: str, registry: Registry | None = None, base: BaseSection | None = None,
                 force: bool = False, device: str | None = None) -> tuple[Loaded, Profile]:
    registry = registry or Registry.open()
    profile = registry.profile(name)
    registry.profile_entries(name)  # a removed adapter fails here, named with the profile
    return load_stack(profile.stack, registry, base, force, device), profile


def set_active(model, names: list[str]) -> None:
    """Switch on exactly ``names`` (summed in order), frozen."""
    model.base_model.set_adapter(list(names), inference_mode=True)


# -- logits and what a merge costs -------------------------------------------------------------

def as_chat(tokenizer, prompt):
    """A plain string becomes one user message when the tokenizer has a chat template."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list, adapters: list[str] | None = None) -> list[torch.Tensor]:
    """One (T, V) fp32 logits tensor per prompt, unpadded, with ``adapters`` active."""
    if adapters is not None:
        set_active(model, adapters)
    device = model_device(model)
    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, as_chat(tokenizer, p))], device=device)  # (1, T)
        out.append(model(input_ids=ids).logits[0].float().cpu())  # (T, V)
    return out


def logit_gap(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """Max and mean absolute logit difference over every prompt position and vocab entry."""
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(reference, other)])
    return {"max_logit_diff": diffs.max().item(), "mean_logit_diff": diffs.mean().item()}


# -- merge methods: one function each, one registry ---------------------------------------------

@dataclass
class MergeSpec:
    method: str = "cat"
    weights: list[float] | None = None  # default 1.0 each: the stack sums its adapters
    density: float = 0.7  # ties / dare: the fraction of entries kept
    mixed_ranks: str = "pad"  # pad (zero-pad to the max rank) | svd (peft's svd variant)
    seed: int = 0  # dare drops entries at random


def lora_layers(model, names: list[str]):
    """(module, [adapter names it holds]) for every LoRA-wrapped linear layer."""
    from peft.tuners.lora import LoraLayer
    for module in model.modules():
        if isinstance(module, LoraLayer):
            held = [n for n in names if n in module.lora_A]
            if held:
                yield module, held


def rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def cat_lora(As: list[torch.Tensor], Bs: list[torch.Tensor], scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: sum_i s_i B_i A_i = B A with A = [s_i A_i] stacked along the rank and B = [B_i].

    A_i: (r_i, in), B_i: (out, r_i) -> A: (sum r_i, in), B: (out, sum r_i); scaling 1."""
    return torch.cat([s * a for a, s in zip(As, scales)], dim=0), torch.cat(Bs, dim=1)


def merge_cat(model, names: list[str], spec: MergeSpec, out: str) -> str:
    from peft import LoraConfig
    configs = [model.peft_config[n] for n in names]
    if any(c.use_dora for c in configs):
        raise CompatibilityError("cat: DoRA adapters cannot be concatenated; use svd")
    targets = [c.target_modules for c in configs]
    if not all(isinstance(t, (set, list)) for t in targets):
        raise CompatibilityError("cat: an adapter's target_modules is a regex; cat needs module lists")
    total = sum(rank(c) for c in configs)
    model.add_adapter(out, LoraConfig(r=total, lora_alpha=total, target_modules=sorted(set().union(*targets)),
                                      lora_dropout=0.0, bias="none", task_type=configs[0].task_type,
                                      inference_mode=True))
    weights = spec.weights or [1.0] * len(names)
    for module, held in lora_layers(model, names):
        w = dict(zip(names, weights))
        A, B = cat_lora([module.lora_A[n].weight.data for n in held], [module.lora_B[n].weight.data for n in held],
                        [w[n] * module.scaling[n] for n in held])
        target_A, target_B = module.lora_A[out].weight, module.lora_B[out].weight  # (R, in), (out, R)
        target_A.data.zero_()[: A.shape[0]] = A.to(target_A.dtype)
        target_B.data.zero_()[:, : B.shape[1]] = B.to(target_B.dtype)
    return f"cat: rank {total} = " + " + ".join(str(rank(c)) for c in configs)


SVD_VARIANT = {"linear": "svd", "ties": "ties_svd", "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd"}
NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "ties_svd", "dare_linear_svd", "dare_ties_svd"}


def padded_copy(model, name: str, target: int) -> str:
    """A copy of adapter ``name`` zero-padded to rank ``target``: A (r, in) -> (R, in), B (out, r)
    -> (out, R), same scaling, so the same output. The source adapter is left as it was."""
    copy = f"{name}_r{target}"
    model.add_adapter(copy, replace(model.peft_config[name], r=target, rank_pattern={}, alpha_pattern={},
                                    inference_mode=True))
    for module, _ in lora_layers(model, [name]):
        for attr in ("lora_A", "lora_B"):
            w = getattr(module, attr)[name].weight.data  # A: (r, in), B: (out, r)
            getattr(module, attr)[copy].weight.data.zero_()[: w.shape[0], : w.shape[1]] = w
        module.scaling[copy] = module.scaling[name]
    return copy


def peft_method(combination: str) -> Callable:
    """A merge method that calls peft's ``add_weighted_adapter`` with ``combination``."""
    def merge(model, names: list[str], spec: MergeSpec, out: str) -> str:
        ranks = [rank(model.peft_config[n]) for n in names]
        how, note, sources = combination, combination, list(names)
        if combination in SVD_VARIANT and len(set(ranks)) > 1:  # peft refuses mixed ranks here
            if spec.mixed_ranks == "svd":
                how = SVD_VARIANT[combination]
                note = f"{combination}: mixed ranks {ranks}, ran peft's {how} variant"
            else:
                sources = [padded_copy(model, n, max(ranks)) if r < max(ranks) else n for n, r in zip(names, ranks)]
                note = f"{combination}: mixed ranks {ranks}, zero-padded to rank {max(ranks)}"
        torch.manual_seed(spec.seed)
        try:
            model.add_weighted_adapter(sources, spec.weights or [1.0] * len(names), out, combination_type=how,
                                       density=spec.density if how in NEEDS_DENSITY else None,
                                       svd_full_matrices=False)
        finally:
            for copy in set(sources) - set(names):
                model.delete_adapter(copy)
        unit_scaling(model, out)
        return note
    return merge


def unit_scaling(model, name: str) -> None:
    """peft folds every source scaling into the merged weights and sets lora_alpha = r; with
    use_rslora inherited from the first source the scaling would be sqrt(r), not 1."""
    model.peft_config[name] = replace(model.peft_config[name], use_rslora=False)
    for module, _ in lora_layers(model, [name]):
        module.scaling[name] = 1.0


METHODS: dict[str, Callable] = {
    "cat": merge_cat,
    "linear": peft_method("linear"),
    "ties": peft_method("ties"),
    "dare_linear": peft_method("dare_linear"),
    "dare_ties": peft_method("dare_ties"),
    "svd": peft_method("svd"),
}
EXACT = {"cat"}


@dataclass
class MergeReport:
    method: str
    note: str  # what ran, and how mixed ranks were handled
    exact: bool
    rank: int
    max_logit_diff: float
    mean_logit_diff: float
    prompts: int
    adapter: str  # its name in the loaded model
    out: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def merge_loaded(loaded: Loaded, spec: MergeSpec = MergeSpec(), out_name: str = "merged",
                 prompts: list | None = None) -> MergeReport:
    """Merge every loaded adapter into one new adapter ``out_name`` and measure it."""
    if spec.method not in METHODS:
        raise AdapterkitError(f"unknown merge method {spec.method!r}; known: {', '.join(METHODS)}")
    if spec.mixed_ranks not in ("pad", "svd"):
        raise AdapterkitError(f"mixed_ranks {spec.mixed_ranks!r}: choose pad or svd")
    prompts = prompts or DEFAULT_PROMPTS
    stacked = prompt_logits(loaded.model, loaded.tokenizer, prompts, loaded.names)
    note = METHODS[spec.method](loaded.model, list(loaded.names), spec, out_name)
    merged = prompt_logits(loaded.model, loaded.tokenizer, prompts, [out_name])
    set_active(loaded.model, loaded.names)
    report = MergeReport(spec.method, note, spec.method in EXACT, loaded.model.peft_config[out_name].r,
                         prompts=len(prompts), adapter=out_name, **logit_gap(stacked, merged))
    log.info("merge %s: max logit diff %.3g, mean %.3g (%s)", spec.method, report.max_logit_diff,
             report.mean_logit_diff, note)
    return report


def merged_manifest(loaded: Loaded, report: MergeReport, name: str, domain: str | None) -> dict:
    first = loaded.entries[0].manifest
    return {
        "name": name, "version": None, "stage": "merge", "domain": domain or first.get("domain", "general"),
        "tags": ["merge", report.method], "base": first["base"],
        "chat_template_sha256": first.get("chat_template_sha256"), "parent": [],
        "recipe": {"base": base_section(first).model_dump(mode="json")},
        "merge": {**report.to_dict(), "sources": [{"ref": e.ref, "sha256": e.weights_sha256}
                                                  for e in loaded.entries]},
        "metrics": {"max_logit_diff": report.max_logit_diff, "mean_logit_diff": report.mean_logit_diff},
    }


def save_merged(loaded: Loaded, report: MergeReport, out: str | Path, name: str,
                domain: str | None = None) -> Path:
    """The merged adapter as a normal adapterkit artifact (PEFT files + manifest + card)."""
    def write(tmp: Path) -> None:
        save_adapter(loaded.model, report.adapter, tmp)

    path = write_artifact(out, write, merged_manifest(loaded, report, name, domain))
    report.out = str(path)
    return path


# -- export: merge into a dequantized copy of the base ------------------------------------------

@torch.no_grad()
def dense_copy(loaded: Loaded, dtype: torch.dtype = torch.float32):
    """The base as it computes when quantized (each 4-bit weight dequantized) plus the sum of
    the loaded adapters' deltas, as a plain transformers model. Merging into the 4-bit base
    instead would re-quantize W + BA and lose the adapters' small updates."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    s = loaded.section
    dense = AutoModelForCausalLM.from_pretrained(
        resolve_base(s.name), revision=s.revision, dtype=torch.float32, use_safetensors=True,
        trust_remote_code=s.trust_remote_code)
    targets = dict(dense.named_modules())
    for name, module in loaded.model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            w = quant.dequantized_weight(module.get_base_layer(), torch.float32)  # (out, in)
            for a in loaded.names:
                if a in module.lora_A:
                    w = w + module.get_delta_weight(a).float()
        elif quant.is_quantized_linear(module) and not name.endswith(".base_layer"):
            w = quant.dequantized_weight(module, torch.float32)
        else:
            continue
        targets[name].weight.data = w.to(targets[name].weight.device)
    return dense.to(dtype).eval()


@dataclass
class ExportReport:
    out: str
    dtype: str
    max_logit_diff: float
    mean_logit_diff: float
    prompts: int

    def to_dict(self) -> dict:
        return asdict(self)


def export_loaded(loaded: Loaded, out: str | Path, dtype: str = "float32",
                  prompts: list | None = None, name: str | None = None) -> ExportReport:
    """Save base + stack as a full model (safetensors) + tokenizer that
    ``AutoModelForCausalLM.from_pretrained`` loads; measured against the stack first."""
    if dtype not in ("float32", "bfloat16"):
        raise AdapterkitError(f"export dtype {dtype!r}: choose float32 or bfloat16")
    prompts = prompts or DEFAULT_PROMPTS
    stacked = prompt_logits(loaded.model, loaded.tokenizer, prompts, loaded.names)
    dense = dense_copy(loaded, quant.DTYPES[dtype])
    gap = logit_gap(stacked, prompt_logits(dense, loaded.tokenizer, prompts))
    report = ExportReport(str(Path(out).resolve()), dtype, prompts=len(prompts), **gap)
    with atomic_dir(out) as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        seal(tmp, {"kind": "export", "name": name, "stage": "export", "dtype": dtype, "base": loaded.entries[0].manifest.get("base"),
                   "sources": [{"ref": e.ref, "sha256": e.weights_sha256} for e in loaded.entries],
                   "report": report.to_dict()})
    return report


# -- profiles --------------------------------------------------------------------------------

def set_profile(registry: Registry, name: str, stack: list[str], mode: str = "stack", method: str = "cat",
                domain: str | None = None, force: bool = False):
    """``Registry.set_profile`` with the merge method checked against ``METHODS``."""
    if method not in METHODS:
        raise RegistryError(f"profile {name!r}: unknown merge method {method!r}; known: {', '.join(METHODS)}")
    return registry.set_profile(name, stack, mode, method, domain, force)


def merge_profile(name: str, out: str | Path, method: str | None = None, registry: Registry | None = None,
                  spec: MergeSpec | None = None, force: bool = False, publish: str | None = None,
                  overwrite: bool = False) -> MergeReport:
    """Merge a profile's stack into one adapter saved at ``out`` (and published, if asked)."""
    registry = registry or Registry.open()
    profile = registry.profile(name)
    spec = replace(spec or MergeSpec(), method=method or profile.method)
    adapter = publish or f"{name}-{spec.method}"
    check_output_dir(out, name=adapter, stage="merge", overwrite=overwrite, key="--out")  # before loading
    loaded, profile = load_profile(name, registry, force=force)
    report = merge_loaded(loaded, spec)
    path = save_merged(loaded, report, out, adapter, profile.domain)
    if publish:
        registry.publish(path, name=publish, domain=profile.domain, tags=["merge"])
    return report


def export_profile(name: str, out: str | Path, dtype: str = "float32", registry: Registry | None = None,
                   force: bool = False, overwrite: bool = False) -> ExportReport:
    """Export a profile as a full model at ``out``; an ``out`` holding anything but an earlier
    export of this profile is refused (unless ``overwrite``) before anything loads."""
    check_output_dir(out, name=name, stage="export", overwrite=overwrite, key="--out")
    loaded, _ = load_profile(name, registry, force=force)
    return export_loaded(loaded, out, dtype, name=name)


# -- serving: one base, rows on different profiles ----------------------------------------------

class Server:
    """One base in memory serving profiles (or single adapter refs) row by row.

    A row on its own is served as its profile says (a stack: every adapter on at once). In
    a mixed batch each row names ONE adapter (peft's ``adapter_names=``), so a stacked profile
    is served there by its exact ``cat`` merge, built once and kept. A ``merge`` profile is
    served by its merge method; an ``export`` profile by its stack, which its fp32 export
    reproduces (the exported model itself loads with transformers, outside this server)."""

    def __init__(self, registry: Registry | None = None, base: BaseSection | None = None,
                 force: bool = False, device: str | None = None):
        self.registry = registry or Registry.open()
        self.base, self.force, self.device = base, force, device
        self.loaded: Loaded | None = None
        self.stacks: dict[str, list[str]] = {}  # key -> adapter names served alone
        self.single: dict[str, str] = {}  # key -> one adapter name for mixed batches

    def add(self, key: str) -> list[str]:
        """Load a profile (or, when no profile has that name, an adapter ref)."""
        if key in self.stacks:
            return self.stacks[key]
        try:
            profile = self.registry.profile(key)
        except RegistryError:
            profile = None
        entries = (self.registry.profile_entries(key) if profile else [self.registry.get(key)])
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
            METHODS[method](self.loaded.model, names, MergeSpec(method), out)
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
        ids, mask = left_pad([prompt_ids(tok, as_chat(tok, p)) for p in prompts], tok.pad_token_id,
                             model_device(model))  # (B, T)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, use_cache=True)
        if len(set(keys)) == 1 and keys[0] is not None:  # one profile: served as it says
            set_active(model, self.stacks[keys[0]])
            gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            rows = [self.adapter_for_row(k) for k in keys]
            gen = model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, **kwargs)
        return tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)


def generate(profile: str, prompts: list, registry: Registry | None = None, max_new_tokens: int = 16,
             force: bool = False) -> list[str]:
    """Greedy answers to ``prompts`` from one profile (or adapter ref)."""
    return Server(registry, force=force).generate(prompts, [profile] * len(prompts), max_new_tokens)
