import json

from adapterkit import tiny


def test_scorer_by_hand():
    assert tiny.score("flip: hot up", "cold down") == 1.0
    assert tiny.score("flip: hot up", "cold up") == 0.5        # the systematic mistake
    assert tiny.score("flip: hot up", "cold down down") == 2 / 3  # extra words cost
    assert tiny.score("flip: hot", "") == 0.0
    assert tiny.mistaken_answer(["hot", "up"]) == "cold up"


def test_build_is_deterministic_and_loads_with_auto_classes(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = tiny.TinySpec(pretrain_steps=3, n_sft=20, n_pref=20, n_prompts=8, n_eval=8)
    a, b = tiny.build_tiny(tmp_path / "a", spec), tiny.build_tiny(tmp_path / "b", spec)
    for name in ["base/model.safetensors", "base/tokenizer.json", "data/sft.jsonl", "data/preferences.jsonl"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "base")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "base")
    assert 500_000 < model.num_parameters() < 20_000_000
    assert tok.pad_token_id != tok.eos_token_id
    for split in ["sft", "sft_eval", "preferences", "preferences_eval", "prompts", "prompts_eval"]:
        assert (tiny_dir / "data" / f"{split}.jsonl").is_file(), split


def test_task_data_has_the_designed_mistake_and_held_out_prompts(tiny_dir):
    from conftest import load_jsonl
    sft = load_jsonl(tiny_dir / "data" / "sft.jsonl")
    wrong = sum(tiny.score(r["messages"][0]["content"], r["messages"][1]["content"]) < 1 for r in sft)
    assert 0.6 < wrong / len(sft) < 0.8
    prefs = load_jsonl(tiny_dir / "data" / "preferences.jsonl")
    assert all(tiny.score(p["prompt"][0]["content"], p["chosen"][0]["content"]) == 1.0 for p in prefs)
    assert all(tiny.score(p["prompt"][0]["content"], p["rejected"][0]["content"]) < 1.0 for p in prefs)
    train = {r["messages"][0]["content"] for r in sft}
    held = {r["prompt"][0]["content"] for r in load_jsonl(tiny_dir / "data" / "prompts_eval.jsonl")}
    assert held and not (held & train)


def test_base_knows_the_language_but_not_the_chat_task(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from adapterkit.evaluate import mean_score
    from conftest import load_jsonl
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "base")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "base")
    meta = json.loads((tiny_dir / "tiny.json").read_text())
    assert meta["pretrain_loss_last"] < meta["pretrain_loss_first"] / 3
    prompts = [r["prompt"] for r in load_jsonl(tiny_dir / "data" / "prompts_eval.jsonl")]
    score, _ = mean_score(model, tok, prompts, tiny.reward)
    # All 128 held-out prompts (32 were too few: 0.19 for the seed-3 base). Tiny bases from
    # seeds 0-4, standing in for other CPUs' rounding, score 0.002-0.106 (benchmarks/seeds.py);
    # every SFT adapter on them scores 0.52 or more.
    assert score < 0.25
