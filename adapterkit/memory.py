"""Will it fit? The predicted peak memory of a stage, from the base's ``config.json`` alone.

    p = plan("tiny_sft", gpu="24GB")    # p.peak_bytes, p.terms, p.max_batch_size; loads no weights

Every term is a pure function of the architecture (``Arch``) and the recipe; its formula is in
its comment. ``B`` rows per micro-batch, ``T`` tokens per row, ``H`` hidden, ``I`` MLP width,
``L`` layers, ``V`` vocabulary, ``qd``/``kvd`` query/key-value widths (heads x head_dim),
``c`` bytes of the compute dtype (bf16 on a GPU: 2; fp32 on CPU: 4). What each stage holds
(adapters, optimizer) follows ``stages/*.py``; the check against measured peaks is
``memcheck.py`` (CPU: tests/test_plan.py, benchmarks/plan_check.py; CUDA: the same script).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from adapterkit.errors import AdapterkitError

GiB = 2**30
BNB_BLOCK = 64                          # bitsandbytes' 4-bit blocksize (one absmax per 64 weights)
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768  # trl 1.16's chunked LM head tile (SFT, DPO): tokens x vocab
MAX_BATCH = 4096                        # the largest batch size --gpu tries
CUDA_RESERVE = GiB                      # CUDA context, allocator slack: outside torch's allocated bytes
# torch's cuBLAS(Lt) workspace, allocated through its caching allocator (counted as allocated):
# 32 MiB per handle on Hopper (4 MiB on older cards), one handle for the forward's thread and
# one for autograd's backward thread. Measured on an H100 (benchmarks/results/plan_check_h100.json).
CUBLAS_WORKSPACE = 2 * 32 * 2**20
UNITS = {"gb": 10**9, "gib": GiB, "mb": 10**6, "mib": 2**20, "tb": 10**12, "tib": 2**40}  # --gpu
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The shapes that decide memory, read from a base's config.json."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    model_type: str = "llama"

    qd = property(lambda self: self.heads * self.head_dim)      # query width
    kvd = property(lambda self: self.kv_heads * self.head_dim)  # key (and value) width

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (Llama-style, gated MLP)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.qd), "k_proj": (h, self.kvd), "v_proj": (h, self.kvd),
                "o_proj": (self.qd, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def from_config(cls, cfg) -> "Arch":
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        return cls(hidden=h, layers=cfg.num_hidden_layers, heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or h // heads,
                   intermediate=getattr(cfg, "intermediate_size", None) or 4 * h, vocab=cfg.vocab_size,
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)), model_type=cfg.model_type)


def load_arch(section) -> Arch:
    """The ``Arch`` of a recipe's base: a local folder's config.json (weights need not be there),
    or a hub name's, fetched alone (``AutoConfig``). Remote code only when the recipe allows it."""
    from transformers import AutoConfig
    from adapterkit.base import resolve_base
    source = resolve_base(section.name)
    try:
        cfg = AutoConfig.from_pretrained(source, revision=section.revision,
                                         trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise AdapterkitError(f"base {section.name!r}: cannot read its config.json ({first}); plan needs "
                              "only that file: a local folder holding it, or a hub name while online") from None
    return Arch.from_config(cfg)


@dataclass(frozen=True)
class Lora:
    """One LoRA adapter: rank and target modules (``all-linear``: the seven of ``LINEARS``)."""
    r: int
    targets: tuple[str, ...] = LINEARS
    trainable: bool = False
    role: str = "adapter"

    def params(self, arch: Arch) -> int:
        # r x (in + out) per targeted linear (A: r x in, B: out x r), in every layer
        return arch.layers * sum(self.r * (i + o) for name, (i, o) in arch.linears().items() if name in self.targets)


def _targets(value) -> tuple[str, ...]:
    names = LINEARS if value in ("all-linear", None) else [value] if isinstance(value, str) else list(value)
    return tuple(n for n in LINEARS if any(n == t or re.fullmatch(t, n) for t in names))


def recorded_lora(ref, fallback: Lora, role: str, notes: list[str]) -> Lora:
    """An existing adapter's rank and targets from its adapter_config.json (nothing else is
    read); the recipe's ``lora`` section, noted as assumed, when it is not there yet."""
    try:
        from adapterkit.adapters import resolve_adapter
        cfg = json.loads((Path(resolve_adapter(ref)) / "adapter_config.json").read_text())
        return Lora(int(cfg["r"]), _targets(cfg.get("target_modules")), role=role)
    except (AdapterkitError, OSError, KeyError, ValueError, TypeError):
        notes.append(f"{role}: not found (yet); assumed the recipe's lora (r={fallback.r})")
        return replace(fallback, trainable=False, role=role)


def stage_adapters(config, notes: list[str]) -> tuple[list[Lora], int]:
    """Every adapter the stage puts on its one base, and the trainable head parameters.

    sft: the new LoRA. reward: LoRA + a trainable copy of the (1, H) score head (peft's
    modules_to_save). dpo: frozen parents + the new LoRA (``continue``: a copy of the last
    parent). ppo: frozen parents + policy + frozen reward + value (a trainable copy of the
    reward's LoRA, or a fresh one) + the (1, H) value head."""
    lo = config.lora
    new = Lora(lo.r, _targets(lo.target_modules), trainable=True, role="trained")
    stage = config.stage
    if stage in ("sft", "reward"):
        return [new], int(stage == "reward")
    section = getattr(config, stage)
    parents = [recorded_lora(p, new, f"parent {p}", notes) for p in section.parent]
    if stage == "dpo":
        if section.mode == "continue":
            new = replace(parents[-1], trainable=True, role="trained (copy of the last parent)")
        return [*parents, new], 0
    from adapterkit import rewards
    out = [*parents, replace(new, role="policy")]
    if rewards.is_function_ref(section.reward):
        return [*out, replace(new, role="value")], 1
    reward = recorded_lora(section.reward, new, "reward", notes)
    value = (replace(reward, trainable=True, role="value (copy of the reward)")
             if section.value_init in (None, "reward") else replace(new, role="value"))
    return [*out, reward, value], 1


def base_bytes(arch: Arch, quantization: str, dense: int, double_quant: bool, head: str) -> int:
    """The base model. Linear layers: nf4 = 1/2 byte per weight + one absmax per 64 (1 byte
    with double quantization, plus an fp32 absmax per 256 of those and a 256-entry fp32 code
    per layer; 4 bytes without); int8 = 1 byte + an fp32 scale per output row; none = dense
    bytes. Not quantized: embeddings (V x H), the LM head (V x H unless tied; a reward model
    has a (1 x H) score head instead) and the 2L+1 norms, at ``dense`` bytes."""
    per_layer = arch.linears().values()
    n = arch.layers * sum(i * o for i, o in per_layer)
    count = arch.layers * len(per_layer)
    if quantization == "nf4":
        absmax = n // BNB_BLOCK
        linear = n // 2 + (absmax + absmax // 256 * 4 + count * 256 * 4 if double_quant else absmax * 4)
    elif quantization == "int8":
        linear = n + arch.layers * sum(o for _, o in per_layer) * 4
    else:
        linear = n * dense
    out_head = arch.hidden if head == "score" else (0 if arch.tied else arch.vocab * arch.hidden)
    return linear + (arch.vocab * arch.hidden + out_head + (2 * arch.layers + 1) * arch.hidden) * dense


def layer_activation_bytes(arch: Arch, c: int, r: int, autocast: bool, masked: bool = True, res: int = 0) -> int:
    """Bytes one decoder layer keeps for backward, per token (Llama layer, SDPA attention, LoRA
    on its linears; the 4-bit matmul keeps no input, its weight being frozen):
    the input x, its norm, the residual after attention and its norm (4H); q after RoPE and
    the attention output, which o_proj reads in place (2qd); k and v (2kvd), repeated to every
    head when a padding mask is passed and kv_heads < heads (transformers then cannot use
    SDPA's GQA: 2qd); the attention's fp32 logsumexp per head; the MLP's gate, SiLU(gate), up
    and their product (4I); the seven LoRA A outputs (7r).
    Under a GPU's autocast each LoRA'd linear keeps its own bf16 copy of its input (the fp32
    LoRA weights make peft cast it): + (5H + qd + I); not measured here (no GPU). The residual
    stream and its norms (the 4H) are in ``res`` bytes: the embeddings' dtype (``dense_bytes``)."""
    kv = 2 * arch.qd if masked and arch.kv_heads < arch.heads else 2 * arch.kvd
    n = 2 * arch.qd + kv + 4 * arch.intermediate + 7 * r
    if autocast:
        n += 5 * arch.hidden + arch.qd + arch.intermediate
    return n * c + 4 * arch.hidden * (res or c) + 4 * arch.heads


def activation_bytes(arch: Arch, rows: int, seq: int, c: int, r: int, checkpointing: bool,
                     autocast: bool, masked: bool = True, res: int = 0) -> tuple[int, int]:
    """(resident, layer backward) bytes of a training forward over rows x T tokens.
    Resident, alive until the backward reaches them: without checkpointing, L layers' saved
    tensors; with it, each layer's input only (L x H); both + the final norm's input and
    output (2H) and, for padded rows, the attention mask (rows x T x T x c, one for all layers).
    Layer backward, the working set while a layer's gradients are computed: the gradients of its
    MLP and input (I + H); with checkpointing + the recomputed layer's saved tensors."""
    tokens, res = rows * seq, res or c  # res: bytes of the residual stream (the embeddings' dtype)
    layer = layer_activation_bytes(arch, c, r, autocast, masked, res)
    work = tokens * (arch.intermediate + arch.hidden) * c
    resident = tokens * 2 * arch.hidden * res + (rows * seq * seq * c if masked else 0)
    if checkpointing:
        return resident + tokens * arch.layers * arch.hidden * res, work + tokens * layer
    return resident + tokens * arch.layers * layer, work


def fused_head_bytes(arch: Arch, rows: int, seq: int, c: int, head_dense: int, device: str) -> int:
    """trl's chunked LM head (SFT, DPO) in backward; the logits are never whole. N = rows x (T-1)
    positions: their hidden states as contiguous rows (N x H, in the head's dtype), their fp32 gradient,
    fp32 statistics (~8N x 4), one tile of min(N, 4096) x 32768 x c (a full tile even for a
    small vocabulary), on a GPU the tile's slice of an fp32 LM head cast to bf16, and on CPU
    (trl's torch fallback instead of its Triton kernel) ~4.5 fp32 temporaries of the tile's
    used part, min(N, 4096) x min(V, 32768)."""
    n = rows * (seq - 1)
    tile = min(n, FUSED_TOKENS)
    cast = min(arch.vocab, FUSED_VOCAB) * arch.hidden * c if head_dense != c else 0
    fallback = int(4.5 * tile * min(arch.vocab, FUSED_VOCAB) * 4) if device == "cpu" else 0
    return n * arch.hidden * (head_dense + 4) + 32 * n + tile * FUSED_VOCAB * c + cast + fallback


def logits_bytes(arch: Arch, rows: int, positions: int, c: int) -> int:
    """PPO's policy logits, B x (R+1) x V: the LM head's output (c), its fp32 copy divided by
    the temperature (4), log-softmax kept for backward (4), and in backward the gradients of
    the log-softmax and of the logits (4 + 4)."""
    return rows * positions * arch.vocab * (c + 16)


def kv_cache_bytes(arch: Arch, rows: int, tokens: int, c: int) -> int:
    """Generation's KV cache at its longest: 2 (K and V) x L x B x (P + R) x kvd x c, plus
    one layer's copy while the cache grows (torch.cat) and the step's fp32 logits (B x V x 12)."""
    per_layer = 2 * rows * tokens * arch.kvd * c
    return arch.layers * per_layer + per_layer + rows * arch.vocab * 12


def inference_bytes(arch: Arch, tokens: int, c: int) -> int:
    """A forward without gradients: one layer's working set at a time, per token (q, k, v, the
    attention output, the MLP's gate, up and product: 3qd + 2kvd + 3I) + residual and norm (2H)."""
    return tokens * (3 * arch.qd + 2 * arch.kvd + 3 * arch.intermediate + 2 * arch.hidden) * c


@dataclass
class Plan:
    """A stage's predicted peak: each term in bytes (``peak_bytes``: their sum), its phase, the card."""
    stage: str
    base: str
    device: str               # "cuda" (the recipe's dtype; auto = bf16) or "cpu" (fp32)
    arch: dict
    shape: dict               # batch_size, seq_len (PPO: rollout_batch_size, response_len)
    adapters: list[dict]
    terms: dict[str, int]
    peak_bytes: int
    peak_phase: str           # "train"; PPO: "rollout", "scoring" or "train"
    activations: dict[str, int] = field(default_factory=dict)  # with and without checkpointing
    gpu_bytes: int | None = None
    usable_bytes: int | None = None  # gpu_bytes - CUDA_RESERVE
    fits: bool | None = None
    max_batch_size: int | None = None  # the largest train.batch_size that fits; and with checkpointing:
    max_batch_size_checkpointed: int | None = None
    notes: list[str] = field(default_factory=list)

    to_dict = asdict  # JSON-ready: plain numbers, strings, lists and dicts


def dtype_bytes(name: str, device: str) -> int:
    """Bytes of ``base.compute_dtype`` on ``device`` (``quant.resolve_dtype``: auto = bf16 on CUDA, fp32 on CPU)."""
    return (2 if device == "cuda" else 4) if name == "auto" else 4 if name == "float32" else 2


def dense_bytes(config, c: int) -> int:
    """Bytes of the parameters that are not quantized (embeddings, LM head, norms): peft's
    prepare_model_for_kbit_training (SFT, reward, DPO on a quantized base) makes them fp32;
    PPO keeps them in the compute dtype."""
    return 4 if config.stage != "ppo" and config.base.quantization != "none" else c


def _static(config, arch: Arch, device: str, c: int, notes: list[str]) -> tuple[dict[str, int], list[Lora], int]:
    """(base, adapters, optimizer, gradients), the adapters, and the largest trained rank."""
    b, dense, head = config.base, dense_bytes(config, c), "score" if config.stage == "reward" else "lm"
    adapters, heads = stage_adapters(config, notes)
    trainable = sum(a.params(arch) for a in adapters if a.trainable) + heads * arch.hidden
    terms = {"base": base_bytes(arch, b.quantization, dense, b.double_quant, head),
             # CPU only: quant.py dequantizes every 4-bit layer into one reused buffer (largest in x out)
             **({"dequant_buffer": max(i * o for i, o in arch.linears().values()) * c}
                if device == "cpu" and b.quantization == "nf4" else {}),
             "adapters": 4 * (sum(a.params(arch) for a in adapters) + 2 * heads * arch.hidden),  # fp32
             "optimizer": 8 * trainable,   # AdamW's two fp32 moments per trainable (fp32) weight
             "gradients": 4 * trainable,   # fp32, as the weights
             **({"cublas_workspace": CUBLAS_WORKSPACE} if device == "cuda" else {})}
    return terms, adapters, max(a.r for a in adapters if a.trainable)


def _terms(config, arch: Arch, device: str, batch: int, seq: int, checkpointing: bool,
           notes: list[str]) -> tuple[dict[str, int], dict[str, int], str, list[Lora]]:
    """(terms summed at the peak, the activations both ways, the peak's phase, the adapters).
    The head's backward (LM head, logits) runs before any layer's: the larger of the two sits
    on the resident activations."""
    c = dtype_bytes(config.base.compute_dtype, device)
    static, adapters, r = _static(config, arch, device, c, notes)
    masked = not config.train.padding_free  # padded rows: an attention mask
    rows = batch * (2 if config.stage in ("reward", "dpo") else 1)  # chosen and rejected in one batch
    tokens = seq + (config.ppo.max_new_tokens if config.stage == "ppo" else 0)
    acts = {k: activation_bytes(arch, rows, tokens, c, r, k == "checkpointed", device == "cuda" and c == 2, masked,
                                dense_bytes(config, c)) for k in ("checkpointed", "full")}
    resident, layer_bwd = acts["checkpointed" if checkpointing else "full"]
    name, size = (("score_head", rows * seq * 4) if config.stage == "reward"  # the (rows, T, 1) scores
                  else ("logits", logits_bytes(arch, batch, config.ppo.max_new_tokens + 1, c)) if config.stage == "ppo"
                  else ("lm_head", fused_head_bytes(arch, rows, seq, c, dense_bytes(config, c), device)))
    train = {"activations": resident, **({name: size} if size >= layer_bwd else {"layer_backward": layer_bwd})}
    both = {k: sum(v) for k, v in acts.items()}
    if config.stage != "ppo":
        return {**static, **train}, both, "train", adapters
    p, chunk = config.ppo, config.train.batch_size * config.train.grad_accum
    phases = {  # what each phase adds to base, adapters and optimizer (gradients only in training)
        # generation: the prompt's forward over a short cache, or the full cache at the end
        "rollout": max({"kv_cache": kv_cache_bytes(arch, p.rollout_batch_size, seq, c),
                        "prefill": inference_bytes(arch, p.rollout_batch_size * seq, c)},
                       {"kv_cache": kv_cache_bytes(arch, p.rollout_batch_size, tokens, c)},
                       key=lambda d: sum(d.values())),
        # reference log-probs and values of batch_size x grad_accum rollouts at a time, no grad
        "scoring": {"logits": chunk * (p.max_new_tokens + 1) * arch.vocab * (c + 8),
                    "forward": inference_bytes(arch, chunk * tokens, c)},
        "train": {"gradients": static.pop("gradients"), **train}}
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    return {**static, **phases[phase]}, both, phase, adapters


def plan(config, overrides: list[str] = (), *, stage: str | None = None, gpu: str | int | None = None,
         device: str = "cuda", batch_size: int | None = None, seq_len: int | None = None,
         arch: Arch | None = None) -> Plan:
    """Predict the peak memory of training a stage, loading no weights (``adapterkit plan``):
    ``ak.plan("tiny_dpo", ["train.batch_size=32"], gpu="24GB").peak_bytes``.

    ``config``: a loaded config, or a recipe (file or shipped name) read with ``overrides``
    (its ``stage:`` key names the stage, else ``stage``). ``device``: ``cuda`` (the GPU plan:
    compute dtype auto = bf16) or ``cpu`` (fp32). ``batch_size``: default ``train.batch_size``.
    ``seq_len``: tokens per row, default ``data.max_length`` (PPO: the prompt's; the response
    adds ``ppo.max_new_tokens``). ``gpu``: a card ("24GB", "80GB", "24GiB" or bytes): whether
    it fits, and the largest ``train.batch_size`` that does. ``arch``: skip reading config.json."""
    from adapterkit.config import StageConfig, load_recipe
    if not isinstance(config, StageConfig):
        config = load_recipe(config, list(overrides), stage)
    arch, notes = arch or load_arch(config.base), []
    batch, seq = batch_size or config.train.batch_size, seq_len or config.data.max_length
    ckpt = config.train.gradient_checkpointing
    terms, acts, phase, adapters = _terms(config, arch, device, batch, seq, ckpt, notes)
    shape = {"batch_size": batch, "seq_len": seq, "gradient_checkpointing": ckpt, **(
        {"rollout_batch_size": config.ppo.rollout_batch_size, "response_len": config.ppo.max_new_tokens}
        if config.stage == "ppo" else {})}
    if arch.model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        notes.append(f"{arch.model_type}: activations use the Llama layer's formula (gated MLP, SDPA)")
    result = Plan(config.stage, config.base.name, device, asdict(arch), shape,
                  [{"role": a.role, "r": a.r, "params": a.params(arch), "trainable": a.trainable} for a in adapters],
                  terms, sum(terms.values()), phase, acts, notes=notes)
    if gpu is not None:
        total = gpu if isinstance(gpu, int) else parse_gpu(gpu)
        usable = total - CUDA_RESERVE
        fits = lambda ck: lambda b: sum(_terms(config, arch, device, b, seq, ck, [])[0].values()) <= usable  # noqa: E731
        result.gpu_bytes, result.usable_bytes, result.fits = total, usable, result.peak_bytes <= usable
        result.max_batch_size, result.max_batch_size_checkpointed = (
            largest_batch(fits(ck), _batch_choices(config)) for ck in (ckpt, True))
    return result


def _batch_choices(config) -> list[int]:
    """The train.batch_size values a stage takes; PPO's divide the rollout batch (/ grad_accum)."""
    if config.stage == "ppo":
        per = config.ppo.rollout_batch_size // config.train.grad_accum
        return [b for b in range(1, per + 1) if per % b == 0]
    return list(range(1, MAX_BATCH + 1))


def largest_batch(fits, choices: list[int]) -> int:
    """The largest choice with ``fits(choice)`` (memory grows with the batch: bisection); 0: none."""
    import bisect
    lo = bisect.bisect_left(choices, True, key=lambda b: not fits(b))  # choices[:lo] fit
    return choices[lo - 1] if lo else 0


def parse_gpu(text: str) -> int:
    """A card's memory as bytes: ``24GB`` (10^9), ``24GiB`` (2^30), ``80GB``, ``1.5TB``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise AdapterkitError(f"--gpu {text!r}: give the card's memory with a unit, e.g. 24GB, 80GB or 24GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


SHARDING = ("none", "ddp", "fsdp")


def per_gpu(p: Plan, world_size: int = 1, sharding: str = "none") -> dict[str, int]:
    """What each GPU holds when the plan's stage runs on ``world_size`` GPUs (per-device batch
    unchanged). none/ddp: every GPU holds the whole plan; DDP adds its gradient buckets (a
    second copy of the gradients). fsdp: base, adapters, gradients and optimizer state are
    sharded over the GPUs (1/N each), and one layer's weights are gathered at a time (x2:
    the next one is prefetched); activations, logits and caches stay per GPU."""
    if sharding not in SHARDING:
        raise AdapterkitError(f"sharding {sharding!r}: one of {', '.join(SHARDING)}")
    terms = dict(p.terms)
    n = world_size if sharding == "fsdp" else 1
    if sharding == "ddp" and world_size > 1:
        terms["ddp_buckets"] = 4 * sum(a["params"] for a in p.adapters if a["trainable"])
    if n > 1:
        gathered = 2 * (terms["base"] + terms["adapters"]) // p.arch["layers"]
        terms |= {k: -(-terms[k] // n) for k in ("base", "adapters", "optimizer", "gradients") if k in terms}
        terms["fsdp_gathered"] = gathered
    return {**terms, "total": sum(terms.values())}


def per_gpu_table(plans: dict[str, Plan], world_size: int = 8) -> list[dict]:
    """Bytes per GPU by term and in total, one row per plan and set-up (1 GPU, DDP and FSDP over
    ``world_size``). ``plans``: e.g. {"8B sft": plan(...), "70B dpo": plan(...)}."""
    setups = {"1 GPU": (1, "none"), f"DDP x{world_size}": (world_size, "ddp"),
              f"FSDP x{world_size}": (world_size, "fsdp")}
    return [{"plan": name, "stage": p.stage, "setup": setup, **per_gpu(p, *setups[setup])}
            for name, p in plans.items() for setup in setups]
