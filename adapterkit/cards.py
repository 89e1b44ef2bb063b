"""Model cards: Hub front matter and a loading snippet in vanilla transformers + peft that
loads what the artifact really is - the whole recorded stack, on the base quantized as it
was trained - with one snippet builder per kind of artifact (``SNIPPETS``).

Paths in a card are relative to the artifact (``HERE``); a local base is never named by its
path (``BASE`` is left for the reader to fill in, and the card says which base it is).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

CAUSAL = ("sft", "dpo", "ppo", "merge")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BASE_PLACEHOLDER = "path/to/base"


# -- facts about the base ---------------------------------------------------------------------

def hub_id(manifest: dict) -> str | None:
    """The base's hub id when it came from the hub; None for a local or registered base."""
    from adapterkit.resolvers import resolve_base_name
    source = str((manifest.get("base") or {}).get("source") or "")
    if not HUB_ID.match(source) or Path(source).expanduser().exists():
        return None
    try:
        return None if resolve_base_name(source) is not None else source
    except Exception:  # a resolver that fails to build its base: not a hub id either way
        return None


def card_license(manifest: dict) -> str | None:
    """The recipe's ``output.license``, else the ``license`` of a local base's own card."""
    recipe = manifest.get("recipe") or {}
    found = (recipe.get("output") or {}).get("license")
    if found:
        return found
    name = (recipe.get("base") or {}).get("name") or ""
    try:
        from adapterkit.resolvers import resolve_base_name
        folder = Path(resolve_base_name(name) or name).expanduser()
        text = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    except Exception:  # noqa: BLE001 - no readable card: no license to copy
        text = ""
    match = re.search(r"^license:\s*(\S+)\s*$", text.split("\n---", 1)[0], re.M) if text.startswith("---") else None
    return match.group(1) if match else None


def base_line(manifest: dict) -> str:
    base = manifest.get("base") or {}
    hub = hub_id(manifest)
    fp = (base.get("fingerprint") or {}).get("id")
    if hub:
        return f'BASE = "{hub}"  # from the Hub; base fingerprint {fp}'
    name = Path(str(((manifest.get("recipe") or {}).get("base") or {}).get("name") or base.get("source"))).name
    how = " (`adapterkit tiny --out DIR` writes it to DIR/base)" if name == "tiny" else ""
    return f'BASE = "{BASE_PLACEHOLDER}"  # the folder of the local base `{name}`{how}, fingerprint {fp}'


def quantization_lines(manifest: dict) -> list[str]:
    """``quantization = ...`` as the adapter was trained (its numbers need the same base)."""
    base = manifest.get("base") or {}
    dtype = base.get("compute_dtype") or "float32"
    q = base.get("quantization") or "none"
    if q == "nf4":
        return ['quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",',
                f'                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{dtype})']
    if q == "int8":
        return ["quantization = BitsAndBytesConfig(load_in_8bit=True)"]
    return ["quantization = None  # trained on the unquantized base"]


# -- the stack ---------------------------------------------------------------------------------

def stack_layers(manifest: dict) -> list[tuple[str, str]]:
    """(label, path relative to this artifact) for each adapter to load, bottom first: the
    recorded parents (a registry entry's siblings in the registry when published), then this
    adapter; a ``continue``-mode adapter replaces its last parent."""
    layers = []
    for p in manifest.get("parent") or []:
        ref = p.get("registry_ref")
        if ref:
            name, version = ref.split("@")
            layers.append((ref, f"../../{name}/{version}"))
        else:
            layers.append((p.get("ref") or p.get("name") or "parent", p.get("path") or "path/to/parent"))
    stage = manifest.get("stage") or ""
    if ((manifest.get("recipe") or {}).get(stage) or {}).get("mode") == "continue":
        layers = layers[:-1]
    label = f"{manifest['name']}@{manifest['version']}" if manifest.get("version") else manifest["name"]
    return [*layers, (label, ".")]


def adapter_names(layers: list[tuple[str, str]]) -> list[str]:
    names = []
    for label, _ in layers:
        name = re.sub(r"\W", "_", label)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def loading_lines(layers: list[tuple[str, str]]) -> list[str]:
    names = adapter_names(layers)
    where = lambda path: "HERE" if path == "." else f'os.path.join(HERE, "{path}")'  # noqa: E731
    lines = [f'model = PeftModel.from_pretrained(base, {where(layers[0][1])}, adapter_name="{names[0]}")']
    lines += [f'model.load_adapter({where(p)}, adapter_name="{n}")' for (_, p), n in zip(layers[1:], names[1:])]
    lines.append(f"model.base_model.set_adapter({names!r})  # every layer on at once: the stack as trained")
    return [*lines, "model.eval()"]


# -- snippets, one per kind of artifact ----------------------------------------------------------

HEADER = ["import os", "", "import torch", "from peft import PeftModel"]


def causal_snippet(manifest: dict) -> list[str]:
    return [*HEADER, "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig", "",
            base_line(manifest), 'HERE = "."  # this adapter\'s folder', *quantization_lines(manifest),
            "tokenizer = AutoTokenizer.from_pretrained(BASE)",
            "base = AutoModelForCausalLM.from_pretrained(BASE, quantization_config=quantization, dtype=torch.float32)",
            *loading_lines(stack_layers(manifest))]


def reward_snippet(manifest: dict) -> list[str]:
    pad = (manifest.get("reward") or {}).get("pad_token")
    return [*HEADER, "from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig",
            "", base_line(manifest), 'HERE = "."  # this adapter\'s folder', *quantization_lines(manifest),
            "tokenizer = AutoTokenizer.from_pretrained(BASE)",
            *([f"tokenizer.pad_token = {pad!r}  # as trained"] if pad else []),
            "base = AutoModelForSequenceClassification.from_pretrained(",
            "    BASE, num_labels=1, quantization_config=quantization, dtype=torch.float32)",
            "base.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token",
            "model = PeftModel.from_pretrained(base, HERE).eval()  # the LoRA and the trained `score` head",
            "# reward of a conversation: model(input_ids=ids, attention_mask=mask).logits[:, 0]"]


def export_snippet(manifest: dict) -> list[str]:
    dtype = manifest.get("dtype") or "float32"
    return ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'HERE = "."  # this folder: a full model, no adapter and no quantization needed',
            "tokenizer = AutoTokenizer.from_pretrained(HERE)",
            f"model = AutoModelForCausalLM.from_pretrained(HERE, dtype=torch.{dtype}).eval()"]


SNIPPETS: dict[str, Callable[[dict], list[str]]] = {
    **{stage: causal_snippet for stage in CAUSAL}, "reward": reward_snippet, "export": export_snippet}

NOTES = {
    "reward": (
        "A reward model: the LoRA plus a scalar head (`score`, one weight row over the last hidden "
        "state), read at the last non-pad token of the conversation. Load it with "
        "`AutoModelForSequenceClassification(num_labels=1)` as above. transformers reports "
        "`score.weight | MISSING` while it builds the classifier: the base has no such head, so it "
        "starts random - that is inherent to loading a head that lives in an adapter. "
        "`PeftModel.from_pretrained` then puts the trained head in its place (peft's "
        "`modules_to_save`, saved in `adapter_model.safetensors`), so the scores are the trained "
        "ones; `transformers.logging.set_verbosity_error()` hides the message."),
}


def quantization_note(manifest: dict) -> str:
    base = manifest.get("base") or {}
    return (f"Load the base as the snippet does - `{base.get('quantization')}`, computing in "
            f"`{base.get('compute_dtype')}` - to reproduce the training numbers: the adapter learned on "
            "the quantized weights, and on an unquantized base its outputs move (a tiny reward model's "
            "scores by up to 1.7). On a CPU with AVX512-BF16, bitsandbytes 0.50 computes 4-bit layers in "
            "bf16 once in eval mode (about 1e-2 off); `adapterkit.quant.keep_compute_dtype(model)`, "
            "called before the first forward, switches that off.")


# -- the card ------------------------------------------------------------------------------------

def front_matter(manifest: dict, library: str, pipeline: str, tags: list[str]) -> str:
    hub, license_ = hub_id(manifest), card_license(manifest)
    lines = ["---", *([f"base_model: {hub}"] if hub else []), *([f"license: {license_}"] if license_ else []),
             f"library_name: {library}", f"pipeline_tag: {pipeline}", "tags:",
             *(f"- {t}" for t in dict.fromkeys(tags)), "---"]
    return "\n".join(lines)


def model_card(manifest: dict, files: list[str]) -> str:
    """The card of an adapter (or a merged adapter); ``files``: what the folder holds, so the
    card only mentions files that are there."""
    stage = manifest.get("stage") or "sft"
    layers = stack_layers(manifest)
    pipeline = "text-classification" if stage == "reward" else "text-generation"
    tags = ["adapterkit", "peft", "lora", stage, *manifest.get("tags", [])]
    merged = (manifest.get("merge") or {}).get("sources") or []
    if merged:
        what = (f"An adapter merged by adapterkit from {' + '.join(s['ref'] for s in merged)} with "
                f"`{manifest['merge'].get('method')}` (max logit diff to the stack "
                f"{manifest['merge'].get('max_logit_diff', 0):.3g}); it loads alone.")
    else:
        under = " + ".join(label for label, _ in layers[:-1])
        what = (f"A LoRA adapter made by adapterkit's **{stage}** stage. "
                + (f"It was trained on top of {under}, and only answers as trained with "
                   "those layers under it: the snippet loads the whole stack." if under else "It sits directly on the base."))
    extra = ["The recipe it was trained with is in `config.yaml`."] if "config.yaml" in files else []
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in manifest.get("metrics", {}).items())
    return "\n".join([
        front_matter(manifest, "peft", pipeline, tags), "", f"# {manifest['name']}", "",
        f"{what} Domain: **{manifest.get('domain')}**.", "", NOTES.get(stage, ""), "",
        "```python", *SNIPPETS.get(stage, causal_snippet)(manifest), "```", "", quantization_note(manifest), "",
        *extra, "`adapterkit.json` holds the lineage, the base fingerprint and the sha256 of every file.", "",
        *(["| metric | value |", "| --- | --- |", metrics] if metrics else []), ""])


def export_card(manifest: dict) -> str:
    """The card of a dense export (a full transformers model)."""
    sources = " + ".join(s["ref"] for s in manifest.get("sources", []))
    report = manifest.get("report") or {}
    return "\n".join([
        front_matter({**manifest, "recipe": manifest.get("recipe") or {}}, "transformers", "text-generation",
                     ["adapterkit", "merge", "export"]), "", f"# {manifest.get('name')}", "",
        f"A full model exported by adapterkit: the base dequantized with {sources} merged into it, saved "
        f"in {manifest.get('dtype')}. Against the stacked adapters on {report.get('prompts')} "
        f"{report.get('prompt_source', 'prompts')}: max logit diff {report.get('max_logit_diff', 0):.3g}.", "",
        "```python", *export_snippet(manifest), "```", "",
        "`adapterkit.json` lists the sources and the sha256 of every file.", ""])
