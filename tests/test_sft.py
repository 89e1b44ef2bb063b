import json

import torch
from safetensors import safe_open

from adapterkit.config import load_config
from helpers import DEVICE, load_nf4, tol


def base_state(model):
    """Every non-LoRA tensor, including the packed 4-bit weights and their quant state."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_one_step_moves_lora_and_leaves_the_4bit_base(tiny_dir, tmp_path):
    import bitsandbytes as bnb
    from adapterkit.stages.sft import setup as setup_sft
    config = load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'a'}", "train.max_steps=3",
                                              "train.progress=false", "data.eval=null"])
    run = setup_sft(config)
    model = run.trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    before_base, before_lora = base_state(model), lora_state(model)
    run.trainer.train()
    after_base, after_lora = base_state(model), lora_state(model)
    assert before_base.keys() == after_base.keys() and len(before_base) > 10
    for name in before_base:
        assert torch.equal(before_base[name], after_base[name]), name
    changed = [n for n in before_lora if not torch.equal(before_lora[n], after_lora[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_artifact_holds_only_adapter_weights_and_a_manifest(sft_adapter):
    path = sft_adapter.path
    for name in ["adapter_config.json", "adapter_model.safetensors", "adapterkit.json", "README.md",
                 "config.yaml", "loss.png"]:
        assert (path / name).is_file(), name
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    manifest = json.loads((path / "adapterkit.json").read_text())
    assert manifest["stage"] == "sft" and manifest["base"]["quantization"] == "nf4"
    assert len(manifest["base"]["fingerprint"]["id"]) == 16 and manifest["chat_template_sha256"]
    assert set(manifest["files"]) >= {"adapter_model.safetensors", "adapter_config.json", "config.yaml"}
    assert manifest["metrics"]["eval_loss"] < manifest["metrics"]["train_loss"] + 1.0
    assert "library_name: peft" in (path / "README.md").read_text()
    # the saved config reloads to the very config that trained the adapter (the manifest's recipe)
    reloaded = load_config("sft", path / "config.yaml")
    assert reloaded.model_dump(mode="json") == manifest["recipe"]
    assert reloaded.lora.r == manifest["recipe"]["lora"]["r"]


def test_vanilla_peft_load_matches_adapterkit_logits(sft_adapter, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from adapterkit.adapters import load_adapters
    from adapterkit.base import load_base
    config = load_config("sft", sft_adapter.path / "config.yaml")
    ours, tok = load_base(config.base)
    ours, _ = load_adapters(ours, [sft_adapter.path])
    # bitsandbytes 0.50 on AVX512-BF16 CPUs switches eval to a bf16 kernel (~3e-2 off); load_nf4
    # keeps the same 4-bit kernel that adapterkit trains and evaluates with.
    plain = PeftModel.from_pretrained(load_nf4(AutoModelForCausalLM, tiny_dir / "base"), str(sft_adapter.path))
    ids = AutoTokenizer.from_pretrained(tiny_dir / "base").apply_chat_template(
        [{"role": "user", "content": "flip: hot up big"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True)["input_ids"].to(DEVICE)
    ours.eval(); plain.eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max().item() < tol(cpu=1e-5, cuda=1e-2)  # the same bf16 kernels on a GPU
    with torch.no_grad(), plain.disable_adapter():
        bare = plain(input_ids=ids).logits
    assert (a - bare).abs().max().item() > 1e-3  # the adapter really changes the output


def test_sft_beats_the_base_on_held_out_prompts(sft_adapter, tiny_dir):
    from adapterkit import tiny
    from adapterkit.adapters import load_adapters
    from adapterkit.base import load_base
    from adapterkit.evaluate import mean_score
    from conftest import load_jsonl
    config = load_config("sft", sft_adapter.path / "config.yaml")
    model, tok = load_base(config.base)
    prompts = [r["prompt"] for r in load_jsonl(tiny_dir / "data" / "prompts_eval.jsonl")]
    base_score, _ = mean_score(model, tok, prompts, tiny.reward)
    model, names = load_adapters(model, [sft_adapter.path])
    sft_score, _ = mean_score(model, tok, prompts, tiny.reward)
    assert sft_score > base_score + 0.3
    assert sft_score < 0.9  # it learns the demonstrations' mistake: preference stages have a job


def test_templates_without_generation_markers_train_on_the_last_turn(tiny_dir, tmp_path, caplog):
    from adapterkit.stages.sft import setup_data
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir / "base")
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    config = load_config("sft", "tiny_sft", [])
    train, _, assistant_only, report = setup_data(config, tok)
    assert not assistant_only and set(train.column_names) == {"prompt", "completion"}
    assert report["format"] == "messages"
    said = [r.getMessage() for r in caplog.records if "generation" in r.getMessage()]
    assert said and "{% generation %}" in said[0] and "%%" not in said[0]  # the log line as it prints
