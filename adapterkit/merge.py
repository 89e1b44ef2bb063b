"""Merge the adapters of a loaded stack into one adapter: a registry of methods, mergekit style.

One ``MergeMethod`` record per method holds every fact about it (its function, whether it is
exact, the ``MergeSpec`` parameters it reads, peft's variant for mixed ranks, its paper);
adding a method is one function and one ``register`` line.

    report = merge_loaded(stack, MergeSpec("cat"))       # exact: max logit diff ~1e-6
    save_merged(stack, report, "runs/merged", "legal-merged")

Every merge measures itself against the stacked adapters (max and mean absolute logit
difference), so the user sees what it cost; the prompts come from the adapters' own held-out
data when recorded, or a file the user names (``stack.heldout_prompts``), and the report says which.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from adapterkit.adapters import activate, save_adapter
from adapterkit.artifact import write_artifact
from adapterkit.base import trained_base
from adapterkit.cards import card_license
from adapterkit.errors import AdapterkitError, CompatibilityError
from adapterkit.registry import Registry
from adapterkit.safety import check_output_dir
from adapterkit.stack import LoadedStack, heldout_prompts, load_key, logit_gap, prompt_logits

log = logging.getLogger("adapterkit")
MIXED_RANKS = ("pad", "svd")


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: ``merge(model, names, spec, out) -> note`` adds adapter ``out``."""
    name: str
    merge: Callable[..., str]
    exact: bool
    params: tuple[str, ...]  # the MergeSpec fields it reads
    paper: str
    svd_variant: str | None = None  # peft's combination for adapters of different ranks


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    METHODS[method.name] = method
    return method


@dataclass(frozen=True)
class MergeSpec:
    """A merge's parameters, checked when made."""
    method: str = "cat"
    weights: tuple[float, ...] | None = None  # default 1.0 each: the stack sums its adapters
    density: float = 0.7  # ties / dare: the fraction of entries kept
    mixed_ranks: str = "pad"  # pad (zero-pad to the max rank) | svd (peft's svd variant)
    seed: int = 0  # dare drops entries at random

    def __post_init__(self):
        if self.method not in METHODS:
            raise AdapterkitError(f"unknown merge method {self.method!r}; known: {', '.join(METHODS)}")
        if self.mixed_ranks not in MIXED_RANKS:
            raise AdapterkitError(f"mixed_ranks {self.mixed_ranks!r}: choose pad or svd")
        if not 0.0 < self.density <= 1.0:
            raise AdapterkitError(f"density {self.density!r}: the fraction of entries kept, in (0, 1]")

    def weights_for(self, names: list[str]) -> list[float]:
        if self.weights is not None and len(self.weights) != len(names):
            raise AdapterkitError(f"{len(self.weights)} merge weights for {len(names)} adapters")
        return list(self.weights) if self.weights is not None else [1.0] * len(names)


# -- the arithmetic, on tensors --------------------------------------------------------------

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


def padded_lora(A: torch.Tensor, B: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) zero-padded to rank ``target``: (R, in), (out, R); B A unchanged."""
    A2, B2 = A.new_zeros(target, A.shape[1]), B.new_zeros(B.shape[0], target)
    A2[: A.shape[0]], B2[:, : B.shape[1]] = A, B
    return A2, B2


# -- methods ------------------------------------------------------------------------------------

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
    weights = spec.weights_for(names)
    for module, held in lora_layers(model, names):
        w = dict(zip(names, weights))
        A, B = cat_lora([module.lora_A[n].weight.data for n in held], [module.lora_B[n].weight.data for n in held],
                        [w[n] * module.scaling[n] for n in held])
        target_A, target_B = module.lora_A[out].weight, module.lora_B[out].weight  # (R, in), (out, R)
        target_A.data.zero_()[: A.shape[0]] = A.to(target_A.dtype)
        target_B.data.zero_()[:, : B.shape[1]] = B.to(target_B.dtype)
    return f"cat: rank {total} = " + " + ".join(str(rank(c)) for c in configs)


def padded_copy(model, name: str, target: int) -> str:
    """A copy of adapter ``name`` zero-padded to rank ``target``: A (r, in) -> (R, in), B (out, r)
    -> (out, R), same scaling, so the same output. The source adapter is left as it was."""
    copy = f"{name}_r{target}"
    model.add_adapter(copy, replace(model.peft_config[name], r=target, rank_pattern={}, alpha_pattern={},
                                    inference_mode=True))
    for module, _ in lora_layers(model, [name]):
        A, B = padded_lora(module.lora_A[name].weight.data, module.lora_B[name].weight.data, target)
        module.lora_A[copy].weight.data.copy_(A)  # (R, in)
        module.lora_B[copy].weight.data.copy_(B)  # (out, R)
        module.scaling[copy] = module.scaling[name]
    return copy


def peft_merge(model, names: list[str], spec: MergeSpec, out: str) -> str:
    """peft's ``add_weighted_adapter`` with the method's combination (``spec.method``)."""
    method = METHODS[spec.method]
    ranks = [rank(model.peft_config[n]) for n in names]
    how, note, sources = method.name, method.name, list(names)
    if method.svd_variant and len(set(ranks)) > 1:  # peft refuses mixed ranks here
        if spec.mixed_ranks == "svd":
            how = method.svd_variant
            note = f"{method.name}: mixed ranks {ranks}, ran peft's {how} variant"
        else:
            sources = [padded_copy(model, n, max(ranks)) if r < max(ranks) else n for n, r in zip(names, ranks)]
            note = f"{method.name}: mixed ranks {ranks}, zero-padded to rank {max(ranks)}"
    torch.manual_seed(spec.seed)
    try:
        model.add_weighted_adapter(sources, spec.weights_for(names), out, combination_type=how,
                                   density=spec.density if "density" in method.params else None,
                                   svd_full_matrices=False)
    finally:
        for copy in set(sources) - set(names):
            model.delete_adapter(copy)
    unit_scaling(model, out)
    return note


def unit_scaling(model, name: str) -> None:
    """peft folds every source scaling into the merged weights and sets lora_alpha = r; with
    use_rslora inherited from the first source the scaling would be sqrt(r), not 1."""
    model.peft_config[name] = replace(model.peft_config[name], use_rslora=False)
    for module, _ in lora_layers(model, [name]):
        module.scaling[name] = 1.0


PEFT_PARAMS = ("weights", "mixed_ranks")
register(MergeMethod("cat", merge_cat, exact=True, params=("weights",),
                     paper="exact: sum_i B_i A_i as one LoRA of rank sum r_i (LoRA, Hu et al. 2021, eq. 3)"))
register(MergeMethod("linear", peft_merge, exact=False, params=PEFT_PARAMS, svd_variant="svd",
                     paper="weighted average of the A and B factors (Model soups, Wortsman et al. 2022)"))
register(MergeMethod("ties", peft_merge, exact=False, params=(*PEFT_PARAMS, "density"), svd_variant="ties_svd",
                     paper="TIES-Merging: trim, elect sign, merge (Yadav et al. 2023, arXiv:2306.01708)"))
register(MergeMethod("dare_linear", peft_merge, exact=False, params=(*PEFT_PARAMS, "density", "seed"),
                     svd_variant="dare_linear_svd",
                     paper="DARE: drop and rescale, then average (Yu et al. 2023, arXiv:2311.03099)"))
register(MergeMethod("dare_ties", peft_merge, exact=False, params=(*PEFT_PARAMS, "density", "seed"),
                     svd_variant="dare_ties_svd", paper="DARE, then TIES's sign election (Yu et al. 2023)"))
register(MergeMethod("svd", peft_merge, exact=False, params=("weights",),
                     paper="truncated SVD of the summed delta sum_i B_i A_i (peft's add_weighted_adapter)"))


# -- merging a loaded stack, and saving the result -------------------------------------------------

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
    prompt_source: str = "generic prompts"  # where the measuring prompts came from

    def to_dict(self) -> dict:
        return asdict(self)


def merge_loaded(loaded: LoadedStack, spec: MergeSpec | None = None, out_name: str = "merged",
                 prompts: list | None = None, prompt_source: str | None = None) -> MergeReport:
    """Merge every loaded adapter into one new adapter ``out_name`` and measure it on ``prompts``
    (default: ``heldout_prompts`` of the loaded entries)."""
    spec = spec or MergeSpec()
    method = METHODS[spec.method]
    if prompts is None:
        prompts, prompt_source = heldout_prompts(loaded.entries)
    stacked = prompt_logits(loaded.model, loaded.tokenizer, prompts, loaded.names)
    note = method.merge(loaded.model, list(loaded.names), spec, out_name)
    merged = prompt_logits(loaded.model, loaded.tokenizer, prompts, [out_name])
    activate(loaded.model, loaded.names)
    report = MergeReport(spec.method, note, method.exact, loaded.model.peft_config[out_name].r,
                         prompts=len(prompts), adapter=out_name, prompt_source=prompt_source or "given prompts",
                         **logit_gap(stacked, merged))
    log.info("merge %s: max logit diff %.3g, mean %.3g (%s)", spec.method, report.max_logit_diff,
             report.mean_logit_diff, note)
    return report


def merged_manifest(loaded: LoadedStack, report: MergeReport, name: str, domain: str | None) -> dict:
    first = loaded.entries[0].manifest
    return {
        "name": name, "version": None, "stage": "merge", "domain": domain or first.get("domain", "general"),
        "tags": ["merge", report.method], "base": first["base"],
        "chat_template_sha256": first.get("chat_template_sha256"), "parent": [],
        "recipe": {"base": trained_base(first, loaded.entries[0].path).model_dump(mode="json"),
                   "output": {"license": card_license(first)}},
        "merge": {**report.to_dict(), "sources": [{"ref": e.ref, "sha256": e.weights_sha256}
                                                  for e in loaded.entries]},
        "metrics": {"max_logit_diff": report.max_logit_diff, "mean_logit_diff": report.mean_logit_diff},
    }


def save_merged(loaded: LoadedStack, report: MergeReport, out: str | Path, name: str,
                domain: str | None = None) -> Path:
    """The merged adapter as a normal adapterkit artifact (PEFT files + manifest + card)."""
    def write(tmp: Path) -> None:
        save_adapter(loaded.model, report.adapter, tmp)

    path = write_artifact(out, write, merged_manifest(loaded, report, name, domain))
    report.out = str(path)
    return path



def merge_profile(name: str, out: str | Path, method: str | None = None, registry: Registry | None = None,
                  spec: MergeSpec | None = None, force: bool = False, publish: str | None = None,
                  overwrite: bool = False, prompts_file: str | None = None, alone: bool = False) -> MergeReport:
    """Merge a profile's stack (or an adapter ref with its parents; ``alone``: by itself) into one
    adapter saved at ``out`` (and published, if asked), measured on ``heldout_prompts``."""
    from adapterkit.profiles import resolve_key
    registry = registry or Registry.open()
    _, profile, _ = resolve_key(registry, name, alone)  # an unknown name or missing parent fails before loading
    spec = replace(spec or MergeSpec(), method=method or (profile.method if profile else "cat"))
    adapter = publish or f"{name.replace('@', '-')}-{spec.method}"
    check_output_dir(out, name=adapter, stage="merge", overwrite=overwrite, key="--out")  # before loading
    loaded, profile, _ = load_key(name, registry, force=force, alone=alone)
    prompts, source = heldout_prompts(loaded.entries, prompts_file)
    report = merge_loaded(loaded, spec, prompts=prompts, prompt_source=source)
    domain = profile.domain if profile else loaded.entries[-1].domain
    path = save_merged(loaded, report, out, adapter, domain)
    if publish:
        registry.publish(path, name=publish, domain=domain, tags=["merge"])
    return report

