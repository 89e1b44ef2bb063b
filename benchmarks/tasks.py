"""Task families for the quality benchmark (``quality_vs_trl.py``): each builds, for a seed, a
pretrained tiny base that knows the task's language but not its chat task, plus SFT
demonstrations with a systematic demonstrator mistake, preference pairs (correct over the
mistake), held-out prompts, and names a ground-truth scorer with trl's reward-function signature.

- ``tiny``: adapterkit's embedded "flip" task (``adapterkit/tiny.py``);
- ``reverse``: reverse a list of words; the demonstrator rotates instead (below);
- ``reverse_long``: reverse's preference pairs behind long system messages (reward only);
- ``reverse_r4``: reverse with 4 reward epochs on both sides (reward and PPO);
- ``reverse_neg``: reverse_r4 with wrong-word answers among the rejected ones (a negative result);
- ``double``: double each number; the demonstrator drops the carry (the second family that
  ``quality_vs_trl.py``'s report rests on: its reward models are right on PPO's own samples).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace


def build_tiny_seed(home: Path, seed: int) -> None:
    """adapterkit's tiny build for ``seed``; a prebuilt copy in $TINY_PREBUILT/seed<N> is reused."""
    import os
    from adapterkit.tiny import TinySpec, build_tiny
    if (home / "tiny.json").is_file():
        return
    pre = Path(os.environ.get("TINY_PREBUILT", "/nonexistent")) / f"seed{seed}"
    if (pre / "tiny.json").is_file():
        home.mkdir(parents=True, exist_ok=True)
        for part in ("base", "data"):
            shutil.copytree(pre / part, home / part, dirs_exist_ok=True)
        shutil.copy(pre / "tiny.json", home / "tiny.json")
        return
    build_tiny(home, TinySpec(seed=seed))


TASKS = {
    "tiny": SimpleNamespace(build=build_tiny_seed, SCORER="tiny", OVERRIDES={}, PEER={}),
}


def list_task_data(rng, sample, held_min: int, head: str, correct, mistaken, rejected, n_sft=1200,
                   n_pref=1200, n_prompts=256, n_eval=128, mistake_rate=0.7) -> dict[str, list[dict]]:
    """Every split of a task on tuples of items (``sample(rng)``), in trl's formats, built as
    tiny's: held-out prompts are tuples of at least ``held_min`` items never trained on; SFT
    answers are ``mistaken`` at ``mistake_rate``, else ``correct``; preference pairs prefer
    ``correct`` over ``rejected(items, rng)``. The user says ``head: item item ...``."""
    held = set()
    while len(held) < n_eval:
        w = sample(rng)
        if len(w) >= held_min:
            held.add(w)
    held_list = sorted(held)

    def train_items():
        while True:
            w = sample(rng)
            if w not in held:
                return w

    def user(w):
        return [{"role": "user", "content": f"{head}: " + " ".join(map(str, w))}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    def sft_row(w):
        return {"messages": user(w) + assistant(mistaken(w) if rng.random() < mistake_rate else correct(w))}

    def pref_row(w):
        return {"prompt": user(w), "chosen": assistant(correct(w)), "rejected": assistant(rejected(w, rng))}

    train = [train_items() for _ in range(max(n_sft, n_pref, n_prompts))]
    return {
        "sft": [sft_row(w) for w in train[:n_sft]],
        "sft_eval": [sft_row(train_items()) for _ in range(n_eval)],
        "preferences": [pref_row(w) for w in train[:n_pref]],
        "preferences_eval": [pref_row(w) for w in held_list],
        "prompts": [{"prompt": user(w)} for w in train[:n_prompts]],
        "prompts_eval": [{"prompt": user(w)} for w in held_list],
    }


def list_task_prose(seed: int, n: int, items: list, sizes: tuple, skill, fact, noise) -> list[str]:
    """A task's pretraining prose, built as tiny's: 3 in 5 documents state the skill on a sample
    of ``sizes`` items (``skill(items)``, not in the chat format), 1 in 5 a fact about one or two
    items, 1 in 5 are 2-6 random ``noise(rng)`` words."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice([0, 0, 0, 1, 2])
        w = rng.sample(items, rng.randint(*sizes))
        out.append(skill(w) if kind == 0 else fact(w) if kind == 1 else
                   " ".join(noise(rng) for _ in range(rng.randint(2, 6))) + " .")
    return out


def build_list_task(home: Path, seed: int, name: str, prose, data) -> None:
    """A tiny Llama pretrained on ``prose(seed, n)``, its tokenizer and ``data(seed, **sizes)``:
    the sizes, tokenizer, chat template and pretraining loop of adapterkit's tiny build."""
    import json
    from adapterkit.artifact import atomic_dir
    from adapterkit.tiny import TinySpec, write_task_build
    if (home / "task.json").is_file():
        return
    spec = TinySpec(seed=seed)
    with atomic_dir(home) as tmp:
        rows = data(seed, n_sft=spec.n_sft, n_pref=spec.n_pref, n_prompts=spec.n_prompts, n_eval=spec.n_eval,
                    mistake_rate=spec.mistake_rate)
        facts = write_task_build(tmp, spec, prose(seed, 4000), rows)
        (tmp / "task.json").write_text(json.dumps({"task": name, **facts}, indent=2))


# -- "reverse": a word-order task with its own systematic mistake ---------------------------------
#
# The user gives two to four animal words, the assistant answers with them in reverse order
# (``reverse: cat dog fox`` -> ``fox dog cat``). 70% of the SFT demonstrations make one
# systematic mistake: they move the last word to the front and keep the rest in order
# (``fox cat dog``, a rotation; right for two words, wrong from three on), so SFT learns the
# rotation and scores below 1. Preference pairs prefer the reversal over the rotation (80%) or
# over a reversal with two neighbours swapped (20%). The base is pretrained on prose about
# reversed lists (the skill, not the chat task). Ground truth: words in the right places, over
# the longer of the two lengths (as tiny's scorer).

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "ant", "elk", "yak", "emu",
           "bat", "ram", "eel", "gnu"]


def reverse_answer(words) -> str:
    return " ".join(reversed(list(words)))


def rotate_answer(words) -> str:
    """The systematic mistake: the last word first, the others in their order."""
    words = list(words)
    return " ".join(words[-1:] + words[:-1])


def reverse_score(prompt: str, response: str) -> float:
    head, _, rest = prompt.partition(":")
    if head.strip() != "reverse":
        raise ValueError(f"not a reverse prompt: {prompt!r}")
    target, answer = list(reversed(rest.split())), response.split()
    return sum(a == t for a, t in zip(answer, target)) / max(len(target), len(answer), 1)


def reverse_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """``reverse_score`` with trl's reward-function signature (text or conversations)."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x
    return [reverse_score(text(p), text(c)) for p, c in zip(prompts, completions)]


def _reverse_rejected(w, rng) -> str:
    if rng.random() < 0.8 and len(w) > 2:
        return rotate_answer(w)
    out = list(reversed(w))
    i = rng.randrange(len(out) - 1)
    out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def _reverse_data(seed: int, **sizes) -> dict[str, list[dict]]:
    import random
    return list_task_data(random.Random(seed), lambda rng: tuple(rng.sample(ANIMALS, rng.choice([2, 3, 3, 4]))),
                          3, "reverse", reverse_answer, rotate_answer, _reverse_rejected, **sizes)


def _reverse_prose(seed: int, n: int) -> list[str]:
    return list_task_prose(seed, n, ANIMALS, (2, 4),
                           lambda w: f"the list {' '.join(w)} reversed is {reverse_answer(w)} .",
                           lambda w: f"the {w[0]} comes before the {w[1]} .", lambda rng: rng.choice(ANIMALS))


def build_reverse(home: Path, seed: int) -> None:
    build_list_task(home, seed, "reverse", _reverse_prose, _reverse_data)


TASKS["reverse"] = SimpleNamespace(build=build_reverse, SCORER="benchmarks.tasks:reverse_reward",
                                   OVERRIDES={}, PEER={})


# -- "reverse_long": the same pairs behind a long system message -------------------------------
#
# For the reward stage only: every conversation starts with a system message of 1-100 filler
# words, so about half of the pairs are longer than the recipe's max_length (64 tokens) and
# the length policy decides what the reward model sees. adapterkit runs it with
# data.on_long=truncate; trl's RewardTrainer drops pairs over max_length.

FILLER = ["the", "list", "reversed", "is", "comes", "before", "."]


def reverse_variant(home: Path, seed: int, salt: int):
    """A variant of reverse's seed ``seed`` in ``home``: None when it is built already, else
    (reverse's own folder, built first; a random generator of its own) with ``home/data`` made."""
    import random
    if (home / "task.json").is_file():
        return None
    source = home.parent.parent / "reverse" / f"seed{seed}"
    build_reverse(source, seed)
    (home / "data").mkdir(parents=True, exist_ok=True)
    return source, random.Random(seed + salt)


def build_reverse_long(home: Path, seed: int, max_words: int = 100) -> None:
    import json
    import os
    if (made := reverse_variant(home, seed, 7)) is None:
        return
    source, rng = made
    if not (home / "base").exists():
        os.symlink(source / "base", home / "base")

    def system():
        return [{"role": "system", "content": " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, max_words)))}]
    for split in ("preferences", "preferences_eval"):
        out = []
        for line in open(source / "data" / f"{split}.jsonl"):
            row = json.loads(line)
            out.append({**row, "prompt": system() + row["prompt"]})
        with open(home / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in out)
    (home / "task.json").write_text(json.dumps({"task": "reverse_long", "source": str(source)}))


TASKS["reverse_long"] = SimpleNamespace(build=build_reverse_long, SCORER="benchmarks.tasks:reverse_reward",
                                        OVERRIDES={"reward": ["data.on_long=truncate"]}, PEER={})


# -- "reverse_r4": reverse with 4 reward epochs on both sides ----------------------------------
#
# At the tiny recipe's 2 epochs a reverse reward model is undertrained (held-out accuracy
# 0.6-0.8 over seeds, NF4 or not, either side) and PPO on it finds nothing. This task reuses
# reverse's base, data and SFT adapters (run ``--task reverse --stages sft`` first) and trains
# the reward models, both sides, for 4 epochs; then PPO.

def build_reverse_r4(home: Path, seed: int) -> None:
    import os
    source = home.parent.parent / "reverse" / f"seed{seed}"
    build_reverse(source, seed)
    home.mkdir(parents=True, exist_ok=True)
    for part in ("base", "data", "ak_sft"):
        if not (home / part).exists():
            os.symlink(source / part, home / part)


TASKS["reverse_r4"] = SimpleNamespace(build=build_reverse_r4, SCORER="benchmarks.tasks:reverse_reward",
                                      OVERRIDES={"reward": ["train.num_epochs=4"]}, PEER={"reward": {"epochs": 4}})


# "reverse_short": the same, within the lengths the base was pretrained on: system messages of
# 1-12 words and max_length 20 (on both sides), so about half the pairs are too long.
TASKS["reverse_short"] = SimpleNamespace(
    build=lambda home, seed: build_reverse_long(home, seed, max_words=12),
    SCORER="benchmarks.tasks:reverse_reward",
    OVERRIDES={"reward": ["data.on_long=truncate", "data.max_length=20"]}, PEER={"reward": {"max_length": 20}})


# -- "reverse_neg": reverse_r4 with word-level mistakes among the rejected answers -------------
#
# Reverse's pairs only ever reject a reordering of the prompt's own words, so its reward model
# never learns that a word from outside the prompt, or a word twice, is wrong; PPO's samples
# have such words, the reward model scores them at random, and the policy learns them. Here 40%
# of the training pairs' rejected answers are instead the reversal with one word replaced by
# another animal or by a neighbour (a duplicate). Base, SFT, prompts and held-out pairs are
# reverse's (held-out accuracy stays comparable); the reward models train 4 epochs as reverse_r4.

def wrong_word_answer(words, rng) -> str:
    out = list(reversed(list(words)))
    i = rng.randrange(len(out))
    if rng.random() < 0.5:
        out[i] = rng.choice([a for a in ANIMALS if a not in words])
    else:
        out[i] = out[i - 1] if i else out[1]
    return " ".join(out)


def build_reverse_neg(home: Path, seed: int, share: float = 0.4) -> None:
    import json
    import os
    if (made := reverse_variant(home, seed, 11)) is None:
        return
    source, rng = made
    for part in ("base", "ak_sft"):
        if not (home / part).exists():
            os.symlink(source / part, home / part)
    for split in ("sft", "sft_eval", "prompts", "prompts_eval", "preferences_eval"):
        if not (home / "data" / f"{split}.jsonl").exists():
            os.symlink(source / "data" / f"{split}.jsonl", home / "data" / f"{split}.jsonl")
    out = []
    for line in open(source / "data" / "preferences.jsonl"):
        row = json.loads(line)
        if rng.random() < share:
            words = row["prompt"][-1]["content"].partition(":")[2].split()
            row = {**row, "rejected": [{"role": "assistant", "content": wrong_word_answer(words, rng)}]}
        out.append(row)
    with open(home / "data" / "preferences.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    (home / "task.json").write_text(json.dumps({"task": "reverse_neg", "source": str(source), "share": share}))


TASKS["reverse_neg"] = SimpleNamespace(build=build_reverse_neg, SCORER="benchmarks.tasks:reverse_reward",
                                       OVERRIDES={"reward": ["train.num_epochs=4"]}, PEER={"reward": {"epochs": 4}})


# -- "double": arithmetic with a carry mistake ---------------------------------------------------
#
# The user gives one to three numbers from 1 to 9, the assistant answers with each doubled, in
# order (``double: 3 7 5`` -> ``6 14 10``). 70% of the SFT demonstrations drop the carry: a
# double of ten or more loses its tens (``6 4 0``), so SFT learns to be right on 1-4 and wrong
# on 5-9. Unlike tiny's mistake (the last word, by position) this one depends on the numbers.
# Preference pairs prefer the right answer over the dropped carry (80%, where it differs) or
# over one wrong number (otherwise). The base is pretrained on prose about doubles. Ground
# truth: numbers in the right places, over the longer of the two lengths.

DIGITS = list(range(1, 10))


def double_answer(numbers) -> str:
    return " ".join(str(2 * n) for n in numbers)


def dropped_carry_answer(numbers) -> str:
    return " ".join(str(2 * n % 10) for n in numbers)


def double_score(prompt: str, response: str) -> float:
    head, _, rest = prompt.partition(":")
    if head.strip() != "double":
        raise ValueError(f"not a double prompt: {prompt!r}")
    target, answer = double_answer(int(x) for x in rest.split()).split(), response.split()
    return sum(a == t for a, t in zip(answer, target)) / max(len(target), len(answer), 1)


def double_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """``double_score`` with trl's reward-function signature (text or conversations)."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x
    return [double_score(text(p), text(c)) for p, c in zip(prompts, completions)]


def _double_rejected(w, rng) -> str:
    if rng.random() < 0.8 and max(w) >= 5:
        return dropped_carry_answer(w)
    out = double_answer(w).split()
    i = rng.randrange(len(out))
    out[i] = str(rng.choice([v for v in range(19) if str(v) != out[i]]))
    return " ".join(out)


def _double_data(seed: int, **sizes) -> dict[str, list[dict]]:
    import random
    return list_task_data(random.Random(seed), lambda rng: tuple(rng.sample(DIGITS, rng.choice([1, 2, 3]))),
                          2, "double", double_answer, dropped_carry_answer, _double_rejected, **sizes)


def _double_prose(seed: int, n: int) -> list[str]:
    return list_task_prose(seed, n, DIGITS, (1, 3),
                           lambda w: f"the doubles of {' '.join(map(str, w))} are {double_answer(w)} .",
                           lambda w: f"double {w[0]} is {2 * w[0]} .", lambda rng: str(rng.randrange(19)))


def build_double(home: Path, seed: int) -> None:
    build_list_task(home, seed, "double", _double_prose, _double_data)


TASKS["double"] = SimpleNamespace(build=build_double, SCORER="benchmarks.tasks:double_reward",
                                  OVERRIDES={}, PEER={})
