import pytest

from adapterkit.config import apply_overrides, load_config, recipe_path, shipped_recipes
from adapterkit.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_override_is_applied_and_typed():
    c = load_config("sft", "tiny_sft", ["train.learning_rate=1e-4", "lora.r=16", "lora.target_modules=[q_proj]"])
    assert c.train.learning_rate == 1e-4 and c.lora.r == 16 and c.lora.target_modules == ["q_proj"]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("sft", write(tmp_path, "train:\n  learning_rat: 0.1\n"))
    assert "train.learning_rat: unknown key" in str(err.value)
    assert "r.yaml" in str(err.value)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError) as err:
        load_config("sft", "tiny_sft", ["train.batch_size=many"])
    assert "train.batch_size" in str(err.value) and "'many'" in str(err.value)


def test_impossible_values_are_refused():
    for override, key in [("lora.r=0", "lora.r"), ("train.learning_rate=-1", "train.learning_rate"),
                          ("lora.lora_dropout=1.5", "lora.lora_dropout"),
                          ("base.quantization=nf3", "base.quantization")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("sft", "tiny_sft", [override])


def test_packing_and_padding_free_conflict():
    with pytest.raises(ConfigError, match="packing and train.padding_free"):
        load_config("sft", "tiny_sft", ["train.packing=true", "train.padding_free=true"])


def test_bad_override_syntax_and_section():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["lora.r"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"lora": 3}, ["lora.r=2"])


def test_recipe_for_another_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="this recipe is for 'dpo'"):
        load_config("sft", write(tmp_path, "stage: dpo\n"))


def test_missing_recipe_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="tiny_sft"):
        load_config("sft", "no_such_recipe")


def test_every_shipped_recipe_opens_with_its_command_and_validates():
    from adapterkit.config import STAGE_CONFIGS
    import yaml
    assert "tiny_sft" in shipped_recipes()
    for name in shipped_recipes():
        text = recipe_path(name).read_text()
        assert text.startswith("# adapterkit "), name
        stage = yaml.safe_load(text)["stage"]
        if stage in STAGE_CONFIGS:
            load_config(stage, name)


def test_compute_dtype_defaults_to_auto_in_every_shipped_recipe():
    from adapterkit.config import STAGE_CONFIGS
    from adapterkit.sections import BaseSection
    import yaml
    assert BaseSection(name="any").compute_dtype == "auto"
    for name in shipped_recipes():
        raw = yaml.safe_load(recipe_path(name).read_text())
        if raw["stage"] in STAGE_CONFIGS:
            assert load_config(raw["stage"], name).base.compute_dtype == "auto", name


def test_auto_resolves_by_device(monkeypatch):
    """auto: fp32 on CPU (so CPU runs are what they were), bf16 on a CUDA card with bf16,
    fp16 on one without; explicit names are taken as they are."""
    import torch
    from adapterkit.quant import resolve_dtype
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert asked == [False, False]  # native bf16 only: emulated bf16 (e.g. a T4) gets fp16


def test_defaults_are_neutral_and_the_tiny_values_live_in_the_recipes():
    from adapterkit.config import build_config
    with pytest.raises(ConfigError, match=r"(?s)base: Field required.*data: Field required"):
        build_config("sft", {})
    with pytest.raises(ConfigError, match=r"data\.train: Field required"):
        build_config("sft", {"base": {"name": "b"}, "data": {"eval": "e.jsonl"}})
    dpo = build_config("dpo", {"base": {"name": "b"}, "data": {"train": "pairs.jsonl"}})
    assert dpo.dpo.parent == [] and dpo.dpo.scorer is None and dpo.dpo.prompts is None  # not the tiny task's
    ppo = build_config("ppo", {"base": {"name": "b"}, "data": {"train": "p.jsonl"}, "ppo": {"reward": "m:f"}})
    assert ppo.data.eval is None and ppo.ppo.scorer is None
    shipped = load_config("dpo", "tiny_dpo")  # the tiny values, from the tiny recipe
    assert shipped.dpo.scorer == "tiny" and shipped.dpo.prompts == "tiny:prompts_eval"


def test_every_recipe_key_is_documented_and_explained(capsys):
    from pydantic import BaseModel
    from adapterkit.cli import main
    from adapterkit.config import STAGE_CONFIGS

    def undocumented(model, prefix=""):
        for name, field in model.model_fields.items():
            if not field.description:
                yield prefix + name
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from undocumented(field.annotation, f"{prefix}{name}.")
    assert [(stage, key) for stage, cls in STAGE_CONFIGS.items() for key in undocumented(cls)] == []
    assert main(["recipes", "--explain"]) == 0
    out = capsys.readouterr().out
    for line in ("  train.resume_from (str | None, default None): Resume from a checkpoint",
                 "  train.save_steps (int, default 0):", "  train.report_to (", "  train.eval_steps (",
                 "  train.packing (bool, default False): SFT: pack", "  base.quantization (nf4 | int8 | none",
                 "  ppo.kl_coef (float, default 0.05):", "# dpo: train a DPO adapter"):
        assert line in out, line


def test_ppo_checkpoint_keys_are_the_train_keys():
    from adapterkit.config import load_config
    from adapterkit.errors import ConfigError
    old = load_config("ppo", "tiny_ppo", ["ppo.checkpoint_every=3", "ppo.checkpoint_dir=/tmp/c",
                                          "ppo.resume_from=latest"])
    new = load_config("ppo", "tiny_ppo", ["train.save_steps=3", "train.checkpoint_dir=/tmp/c",
                                          "train.resume_from=latest"])
    assert old.train == new.train and old.ppo == new.ppo
    assert "checkpoint_every" not in old.model_dump()["ppo"]  # saved configs carry the one spelling
    with pytest.raises(ConfigError, match="train.save_steps and its alias ppo.checkpoint_every"):
        load_config("ppo", "tiny_ppo", ["ppo.checkpoint_every=3", "train.save_steps=4"])
    assert load_config("ppo", "tiny_ppo", ["train.eval_steps=3", "ppo.eval_every=0"]).ppo.eval_every == 3


def test_own_training_data_drops_the_recipes_tiny_evaluation(caplog):
    """tiny_ppo with the user's prompts must not pick its best step by the tiny task's score on
    the tiny task's prompts: the recipe's held-out split and scorer go with its training data."""
    with caplog.at_level("WARNING", logger="adapterkit"):
        ppo = load_config("ppo", "tiny_ppo", ["data.train=my_prompts.jsonl"])
    assert ppo.data.eval is None and ppo.ppo.scorer is None
    assert "data.eval=tiny:prompts_eval, ppo.scorer=tiny are dropped" in caplog.text
    dpo = load_config("dpo", "tiny_dpo", ["data.train=my_pairs.jsonl", "data.eval=my_eval.jsonl"])
    assert (dpo.data.eval, dpo.dpo.prompts, dpo.dpo.scorer) == ("my_eval.jsonl", None, None)
    kept = load_config("ppo", "tiny_ppo", ["data.train=my_prompts.jsonl", "ppo.scorer=tiny"])  # named again: kept
    assert kept.ppo.scorer == "tiny" and kept.data.eval is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="adapterkit"):  # the tiny task's own data, or another base: unchanged
        for overrides in (["data.train=tiny:preferences_eval"], ["base.name=/models/mine"]):
            same = load_config("dpo", "tiny_dpo", overrides)
            assert (same.data.eval, same.dpo.prompts, same.dpo.scorer) == ("tiny:preferences_eval", "tiny:prompts_eval", "tiny")
    assert "dropped" not in caplog.text
