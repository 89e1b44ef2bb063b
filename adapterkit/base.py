"""Load a base (quantized or not) and fingerprint it. Named adapters on it: ``adapters.py``."""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from adapterkit import quant
from adapterkit.artifact import sha256_file, sha256_json
from adapterkit.distributed import sharded
from adapterkit.sections import BaseSection
from adapterkit.errors import AdapterkitError, CompatibilityError

log = logging.getLogger("adapterkit")


def default_device() -> str:
    """This process's device (``distributed.device``): ``cuda`` or ``cpu`` alone, each
    process's own ``cuda:<local rank>`` under ``accelerate launch``."""
    from adapterkit.distributed import device
    return device()


def resolve_base(name: str) -> str:
    """A registered name (``tiny``: the cached embedded base; see ``resolvers.py``) -> its
    directory; a local directory stays; else a hub name."""
    from adapterkit.resolvers import resolve_base_name
    registered = resolve_base_name(name)
    if registered is not None:
        return registered
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AdapterkitError(f"base {name!r}: no such directory")
    return name


@contextmanager
def loading(what: str, name: str):
    """Turn transformers' errors for a base that cannot be read (no such folder, not on the hub
    or not cached while offline, an unknown architecture without trust_remote_code, a
    truncated file) into one line naming the base."""
    try:
        yield
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterkitError(f"base {name!r}: cannot load its {what} ({first[:300]})") from None


def load_tokenizer(section: BaseSection):
    from transformers import AutoTokenizer
    source = resolve_base(section.name)
    with loading("tokenizer", section.name):
        tok = AutoTokenizer.from_pretrained(source, revision=section.revision,
                                            trust_remote_code=section.trust_remote_code)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Reuse an existing non-EOS special token (no new embedding rows, so adapters stay
        # portable); refuse when there is none.
        spare = [t for t in (tok.unk_token, *getattr(tok, "all_special_tokens", []))
                 if t is not None and t not in (tok.eos_token, tok.bos_token)]
        if not spare:
            from adapterkit.data import check_chat_contract
            check_chat_contract(tok, source)
        tok.pad_token = spare[0]
    return tok


def release_freed_memory(device) -> None:
    """On CPU, collect garbage and hand freed heap pages back to the OS: after loading, the
    full-precision tensors read while quantizing (glibc keeps freed pages otherwise). Not
    called per training step: with ``quant.reuse_dequant_buffer`` a step's peak RSS is the
    same without it (311M PPO, 14 steps: 1591 MB), and each call cost 0.3-0.4 s."""
    if torch.device(device).type != "cpu":
        return
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


def load_model(section: BaseSection, device: str | None = None, num_labels: int | None = None):
    """The base causal LM, quantized as the section says, on this process's device
    (``default_device``: CUDA when present), in the section's compute dtype as resolved for
    that device (``quant.resolve_dtype``).

    ``num_labels`` loads it as a sequence classifier instead (a reward model: 1)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    device = device or default_device()
    dtype = quant.resolve_dtype(section.compute_dtype, device)
    qconfig = quant.bnb_config(section.quantization, dtype, section.double_quant,
                               quant.storage_dtype(section.quant_storage, dtype))
    auto, extra = ((AutoModelForCausalLM, {}) if num_labels is None
                   else (AutoModelForSequenceClassification, {"num_labels": num_labels}))
    # FSDP / ZeRO-3 place (and shard) the weights themselves: no device map there
    placement = {} if sharded() else {"device_map": {"": device}}
    with loading("weights", section.name):
        model = auto.from_pretrained(
            resolve_base(section.name), revision=section.revision, quantization_config=qconfig, **extra,
            dtype=dtype, **placement,
            trust_remote_code=section.trust_remote_code, use_safetensors=True)
    model.config.use_cache = False
    quant.keep_compute_dtype(model)  # eval computes like training (see quant.py)
    quant.reuse_dequant_buffer(model)  # CPU: one dequantization buffer, not one per call
    release_freed_memory(device)  # the full-precision tensors read while quantizing
    return model


def load_base(section: BaseSection, device: str | None = None):
    """(model, tokenizer) for a base section."""
    return load_model(section, device), load_tokenizer(section)


# -- fingerprint -----------------------------------------------------------------------------

ARCH_IGNORED = {"_name_or_path", "transformers_version", "quantization_config", "_commit_hash",
                "torch_dtype", "dtype", "use_cache", "architectures_version",
                # a head's labels are not the backbone's identity: a reward model (num_labels=1)
                # and the policy share one base fingerprint
                "id2label", "label2id", "num_labels", "problem_type"}


def weights_part(path: Path) -> str:
    """The weights' share of a local base's fingerprint: read from the files, nothing loaded."""
    return sha256_json({p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))})


@functools.lru_cache(maxsize=4)
def _weights_part_of(path: str, stats: tuple) -> str:
    return weights_part(Path(path))


def _cached_weights_part(path: Path) -> str:
    """``weights_part``, hashed once per process while the files keep their size and mtime: a
    pipeline fingerprints its base for every stage (16 GB of an 8B base each time otherwise).
    ``check_base_on_disk`` always hashes anew."""
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.glob("*.safetensors")))
    return _weights_part_of(str(path.resolve()), stats)


def trained_base(manifest: dict, where: Path | None = None) -> BaseSection:
    """The base an adapter was trained on, from its recipe (or its manifest's base record),
    with ``trust_remote_code`` off: a manifest is someone else's file and may not choose to
    run code here; only the user's own recipe or command line can turn it on. A local base is
    recorded relative to the artifact: ``where`` is the artifact's folder."""
    from pydantic import ValidationError
    from adapterkit.artifact import recorded_path
    recipe_base = (manifest.get("recipe") or {}).get("base")
    if recipe_base and where is not None and isinstance(recipe_base.get("name"), str):
        recipe_base = {**recipe_base, "name": recorded_path(Path(where), recipe_base["name"])}
    try:
        if recipe_base:
            section = BaseSection.model_validate(recipe_base)
        else:
            b = manifest["base"]
            section = BaseSection(name=b["source"], quantization=b.get("quantization", "nf4"),
                                  compute_dtype=b.get("compute_dtype", "float32"))
    except (ValidationError, KeyError, TypeError) as err:
        raise CompatibilityError(f"{manifest.get('name')}: its manifest does not name a usable base "
                                 f"({str(err).splitlines()[0]})") from None
    return section.model_copy(update={"trust_remote_code": False})


def check_base_on_disk(section: BaseSection, expected: dict, who: str) -> None:
    """Before any of a base's code or weights load: a local base's safetensors files must hash
    to the fingerprint the adapter was trained on. A mismatch is refused here, so a manifest
    that names some other folder never gets its model built."""
    path = Path(resolve_base(section.name))
    recorded = (expected or {}).get("weights")
    if not path.is_dir() or recorded is None:
        return  # a hub base: its revision is only known once loaded; checked after, as before
    if weights_part(path) != recorded:
        raise CompatibilityError(f"{who}: trained on base {expected.get('id')}, but the weights in "
                                 f"{path} are not that base's; refusing to load it")


def fingerprint(model, tokenizer) -> dict:
    """Architecture config, tokenizer vocabulary and weights identity, hashed together.

    Weights: the sha256 of every safetensors file of a local base, or the hub revision of
    a downloaded one. Quantization is recorded beside it, not in it: an adapter trained on
    nf4 can be stacked on a bf16 copy of the same base (with a warning)."""
    return _fingerprint(model.config, tokenizer)


def disk_fingerprint(section: BaseSection, tokenizer) -> dict:
    """``fingerprint`` of the base a section names, from its config and files alone: no weights
    load (``adapterkit pipeline`` decides before loading anything whether a stage is reused)."""
    from transformers import AutoConfig
    with loading("config", section.name):
        config = AutoConfig.from_pretrained(resolve_base(section.name), revision=section.revision,
                                            trust_remote_code=section.trust_remote_code)
    return _fingerprint(config, tokenizer)


def _fingerprint(model_config, tokenizer) -> dict:
    config = {k: v for k, v in model_config.to_dict().items() if k not in ARCH_IGNORED}
    source = model_config._name_or_path
    path = Path(source)
    if path.is_dir():
        weights = _cached_weights_part(path)
    else:
        weights = sha256_json({"hub_revision": getattr(model_config, "_commit_hash", None) or "unknown"})
    parts = {"config": sha256_json(config), "tokenizer": sha256_json(sorted(tokenizer.get_vocab().items())),
             "weights": weights}
    return {"id": sha256_json(parts)[:16], **parts, "source": source}
