"""The embedded default: a tiny Llama, its tokenizer and a toy task, built offline.

The task, "flip": the user gives one to three words, the assistant answers with the
opposite of each, in order (``flip: hot up`` -> ``cold down``). The ground-truth
scorer gives the fraction of answer positions that are right.

Why it suits preference training: 70% of the SFT demonstrations share one systematic
mistake (the last word is echoed instead of flipped), so greedy decoding after SFT
learns the mistake and scores well below 1. The preference pairs prefer the correct
answer over that mistake, so reward, DPO and PPO have a measurable job left.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapterkit import resolvers
from adapterkit.artifact import atomic_dir, sha256_json

PAIRS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"),
         ("light", "dark"), ("open", "closed"), ("new", "old"), ("high", "low"),
         ("wet", "dry"), ("early", "late"), ("loud", "quiet"), ("hard", "soft")]
OPPOSITE = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
WORDS = sorted(OPPOSITE)

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the build; its hash names the cache folder."""
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 400
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    mistake_rate: float = 0.7
    n_sft: int = 1200
    n_pref: int = 1200
    n_prompts: int = 256
    n_eval: int = 128
    version: int = 2  # 2: pretraining documents end with EOS

    def key(self) -> str:
        return sha256_json(asdict(self))[:12]


# -- the task ---------------------------------------------------------------------------

def make_prompt(words: list[str]) -> str:
    return "flip: " + " ".join(words)


def correct_answer(words: list[str]) -> str:
    return " ".join(OPPOSITE[w] for w in words)


def mistaken_answer(words: list[str]) -> str:
    """The systematic mistake most demonstrations make: the last word is echoed."""
    return " ".join([OPPOSITE[w] for w in words[:-1]] + [words[-1]])


def prompt_words(prompt: str) -> list[str]:
    head, _, rest = prompt.partition(":")
    if head.strip() != "flip":
        raise ValueError(f"not a flip prompt: {prompt!r}")
    return rest.split()


def score(prompt: str, response: str) -> float:
    """Ground truth: right words in the right places, over the longer of the two lengths."""
    target = [OPPOSITE[w] for w in prompt_words(prompt)]
    answer = response.split()
    right = sum(a == t for a, t in zip(answer, target))
    return right / max(len(target), len(answer), 1)


def reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """``score`` with trl's reward-function signature (see ``adapterkit.rewards``): prompts
    and completions as text or as conversations."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x
    return [score(text(p), text(c)) for p, c in zip(prompts, completions)]


def _sample_words(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(WORDS, rng.choice([1, 2, 3])))


def _split_prompts(rng: random.Random, n_eval: int) -> tuple[set, list]:
    """Held-out prompts are word tuples (of 2-3 words) never seen in training."""
    held = set()
    while len(held) < n_eval:
        w = _sample_words(rng)
        if len(w) > 1:
            held.add(w)
    return held, sorted(held)


def _train_words(rng: random.Random, held: set) -> tuple[str, ...]:
    while True:
        w = _sample_words(rng)
        if w not in held:
            return w


def _user(words) -> list[dict]:
    return [{"role": "user", "content": make_prompt(list(words))}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _corrupt(rng: random.Random, words) -> str:
    """A rejected answer: mostly the systematic mistake, sometimes a random wrong word."""
    if rng.random() < 0.8:
        return mistaken_answer(list(words))
    answer = [OPPOSITE[w] for w in words]
    i = rng.randrange(len(answer))
    answer[i] = rng.choice([w for w in WORDS if w != answer[i]])
    return " ".join(answer)


def make_task_data(spec: TinySpec) -> dict[str, list[dict]]:
    """Every split of the task, as rows in trl's formats."""
    rng = random.Random(spec.seed)
    held, held_list = _split_prompts(rng, spec.n_eval)

    def sft_row(words):
        wrong = rng.random() < spec.mistake_rate
        text = mistaken_answer(list(words)) if wrong else correct_answer(list(words))
        return {"messages": _user(words) + _assistant(text)}

    def pref_row(words):
        return {"prompt": _user(words), "chosen": _assistant(correct_answer(list(words))),
                "rejected": _assistant(_corrupt(rng, words))}

    train = [_train_words(rng, held) for _ in range(max(spec.n_sft, spec.n_pref, spec.n_prompts))]
    return {
        "sft": [sft_row(w) for w in train[:spec.n_sft]],
        "sft_eval": [sft_row(_train_words(rng, held)) for _ in range(spec.n_eval)],
        "preferences": [pref_row(w) for w in train[:spec.n_pref]],
        "preferences_eval": [pref_row(w) for w in held_list],
        "prompts": [{"prompt": _user(w)} for w in train[:spec.n_prompts]],
        "prompts_eval": [{"prompt": _user(w)} for w in held_list],
    }


def pretraining_text(rng: random.Random, n: int) -> list[str]:
    """The task's language without the task: plain sentences about opposites."""
    out = []
    for _ in range(n):
        a = rng.choice(WORDS)
        kind = rng.choice([0, 0, 0, 1, 2])
        if kind == 0:  # the skill the task needs, in plain prose: position-wise opposites
            words = rng.sample(WORDS, rng.randint(1, 3))
            out.append(f"the opposites of {' '.join(words)} are {correct_answer(words)} .")
        elif kind == 1:
            out.append(f"{a} and {OPPOSITE[a]} are opposites .")
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + " .")
    return out


# -- tokenizer and base -----------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained here, wrapped as a fast tokenizer with our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>",
                                   extra_special_tokens={"user_token": "<|user|>", "assistant_token": "<|assistant|>", "system_token": "<|system|>"})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def _pretrain(model, tokenizer, texts: list[str], spec: TinySpec) -> list[float]:
    """A short causal-LM pretraining so adapters adapt a real, if tiny, language model.

    Every document ends with the EOS token, as a real base's do: a base that has never
    predicted EOS leaves SFT to learn its output row from scratch through LoRA, which it
    does only slowly (the answers then run on)."""
    rng = random.Random(spec.seed + 1)
    texts = [text + tokenizer.eos_token for text in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.pretrain_lr,
                                                total_steps=spec.pretrain_steps, pct_start=0.1)
    losses = []
    model.train()
    for _ in range(spec.pretrain_steps):
        batch = tokenizer(rng.sample(texts, spec.pretrain_batch), padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def write_task_build(tmp: Path, spec: TinySpec, texts: list[str], data: dict[str, list[dict]]) -> dict:
    """Into ``tmp``: a tokenizer trained on ``texts`` and the SFT turns, a Llama of ``spec``'s
    sizes pretrained on ``texts`` (``base/``), and every split as ``data/<split>.jsonl``.
    Any task with pretraining prose and rows in trl's formats builds this way (the tiny task
    here, the benchmarks' second family). Returns the build's facts."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(spec.seed)  # the only torch randomness: the model's init and batches
    tokenizer = train_tokenizer(texts + [m["content"] for r in data["sft"] for m in r["messages"]],
                                spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    losses = _pretrain(model, tokenizer, texts, spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp / "base", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "base")
    (tmp / "data").mkdir()
    for split, rows in data.items():
        with open(tmp / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"spec": asdict(spec), "pretrain_loss_first": losses[0], "pretrain_loss_last": losses[-1],
            "n_parameters": model.num_parameters()}


def build_tiny(out: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Write ``out/base`` (model + tokenizer) and ``out/data/*.jsonl``; atomic."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        facts = write_task_build(tmp, spec, pretraining_text(random.Random(spec.seed), 4000),
                                 make_task_data(spec))
        (tmp / "tiny.json").write_text(json.dumps({**facts, "key": spec.key()}, indent=2))
    return out


def tiny_home() -> Path:
    root = Path(os.environ.get("ADAPTERKIT_HOME", Path.home() / ".cache" / "adapterkit"))
    return root / f"tiny-{TinySpec().key()}"


def ensure_tiny(out: str | os.PathLike | None = None, refresh: bool = False, overwrite: bool = False) -> Path:
    """The cached build (built on first use), or a copy of it at ``out``.

    The build is deterministic, so copying the cache equals building anew; ``refresh``
    rebuilds the cache first. An ``out`` holding anything but a tiny build is refused unless
    ``overwrite``, before anything is built."""
    home = tiny_home()
    if out is not None and not (Path(out) / "tiny.json").is_file():
        from adapterkit.safety import check_output_dir
        check_output_dir(out, name=None, stage=None, overwrite=overwrite, key="--out")
    if refresh or not (home / "tiny.json").is_file():
        build_tiny(home)
    if out is None or Path(out).resolve() == home.resolve():
        return home
    out = Path(out)
    if not (out / "tiny.json").is_file() or refresh:
        with atomic_dir(out) as tmp:
            shutil.copytree(home, tmp, dirs_exist_ok=True)
    return out


def resolve_tiny_data(ref: str) -> Path:
    """``tiny:sft`` -> the cached ``data/sft.jsonl``."""
    split = ref.split(":", 1)[1]
    path = ensure_tiny() / "data" / f"{split}.jsonl"
    if not path.is_file():
        from adapterkit.errors import ConfigError
        names = sorted(p.stem for p in (ensure_tiny() / "data").glob("*.jsonl"))
        raise ConfigError(f"{ref}: the tiny task has no split {split!r}; known: {', '.join(names)}")
    return path


def _tiny_base(name: str) -> Path:
    return ensure_tiny() / "base"


resolvers.register_base("tiny", _tiny_base)  # base.name: tiny
resolvers.register_data("tiny", resolve_tiny_data)  # data.train: tiny:<split>
resolvers.register_reward("tiny", "adapterkit.tiny:reward")  # dpo.scorer / ppo.scorer / ppo.reward: tiny
