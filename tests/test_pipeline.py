"""``adapterkit pipeline``: the stages of a pipeline recipe end to end on the tiny default, every
stage reused on a second run (nothing trains, no file changes), a run SIGKILLed mid-stage and
run again finishing with every adapter (the killed stage resumed from its checkpoint), and a bad
recipe refused in one line before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.cli import main
from test_resume import kill_when_checkpointed

STEPS = ("sft", "reward", "dpo", "ppo")


def small_data(tiny_dir: Path, folder: Path, rows: int = 16) -> dict[str, Path]:
    """The tiny task's files, the held-out ones cut to ``rows`` (a short evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for src in sorted((tiny_dir / "data").glob("*.jsonl")):
        lines = src.read_text().splitlines(keepends=True)
        out[src.stem] = folder / src.name
        out[src.stem].write_text("".join(lines[:rows] if src.stem.endswith("_eval") else lines))
    return out


def write_recipe(tmp_path: Path, tiny_dir: Path, score: bool = True, evals: bool = True, **top) -> Path:
    """A user pipeline: shipped stage recipes, its own JSONL files, a few steps each (with
    ``evals=False``, no held-out evaluation: only the training runs)."""
    d = small_data(tiny_dir, tmp_path / "data")
    recipe = {
        "stage": "pipeline", "out": str(tmp_path / "run"), **top,
        "overrides": [f"base.name={tiny_dir / 'base'}"],
        "publish": {"registry": str(tmp_path / "adapters"), "prefix": "t-", "profile": "flip"},
        "stages": {
            "sft": {"recipe": "tiny_sft", "overrides": [f"data.train={d['sft']}", f"data.eval={d['sft_eval']}",
                                                        "train.max_steps=4"]},
            "reward": {"recipe": "tiny_reward", "overrides": [f"data.train={d['preferences']}", "train.max_steps=4",
                                                              f"data.eval={d['preferences_eval']}"]},
            "dpo": {"recipe": "tiny_dpo", "parent": ["sft"], "reward": "reward",
                    "overrides": [f"data.train={d['preferences']}", f"data.eval={d['preferences_eval']}",
                                  f"dpo.prompts={d['prompts_eval']}", "train.max_steps=4", "train.batch_size=4"]},
            "ppo": {"recipe": "tiny_ppo", "parent": ["sft"], "reward": "reward",
                    "overrides": [f"data.train={d['prompts']}", f"data.eval={d['prompts_eval']}", "train.max_steps=1",
                                  "ppo.rollout_batch_size=16", "train.batch_size=8", "ppo.ppo_epochs=1",
                                  "ppo.eval_every=0", "ppo.keep_best=false", "ppo.kl_coef=0.2"]}}}
    if not evals:
        for name, step in recipe["stages"].items():
            step["overrides"] += ["data.eval=null", *(["dpo.prompts=null"] if name == "dpo" else [])]
    if score:
        recipe["score"] = {"scorer": "tiny", "prompts": str(d["prompts_eval"])}
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def files_state(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_pipeline_runs_end_to_end_then_reuses_every_stage(tiny_dir, tmp_path, capsys, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_dir, frontier={"dpo": "dpo", "ppo": "ppo", "betas": [0.1, 1.0],
                                                        "kl_coefs": [0.2]})
    assert main(["pipeline", str(recipe), "--quiet", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    stages = first["stages"]
    assert list(stages) == ["base", *STEPS]
    for name in STEPS:
        assert stages[name]["reused"] is False and stages[name]["registry_ref"] == f"t-{name}@1"
        assert (Path(stages[name]["adapter"]) / "adapter_model.safetensors").is_file()
    for name in ("sft", "dpo", "ppo"):  # each policy scored, against its parent
        assert 0 <= stages[name]["score"] <= 1
    assert stages["sft"]["parent"] == "base" and stages["dpo"]["parent"] == stages["ppo"]["parent"] == "sft"
    assert 0 <= stages["reward"]["accuracy"] <= 1 and "win_rate" in stages["dpo"]
    manifest = json.loads((tmp_path / "run" / "dpo" / "adapterkit.json").read_text())
    sft_sha = json.loads((tmp_path / "run" / "sft" / "adapterkit.json").read_text())["files"]["adapter_model.safetensors"]
    assert manifest["parent"][0]["sha256"] == sft_sha and manifest["inputs"]["adapters"]["dpo.parent"] == [sft_sha]
    assert first["profile"] == "flip" and first["registry_tree"][1].split()[1].startswith("t-sft@1")
    assert first["plots"] and all(Path(p).is_file() for p in first["plots"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"] == stages
    frontier = json.loads((tmp_path / "run" / "frontier" / "frontier.json").read_text())  # the steps are points
    points = {(p["method"], p["coef"]): p for p in frontier["points"]}
    assert set(points) == {("dpo", 0.1), ("dpo", 1.0), ("ppo", 0.2)} and first["frontier"] in first["plots"]
    assert points[("dpo", 0.1)]["adapter"] == stages["dpo"]["adapter"] and not points[("dpo", 0.1)]["trained"]
    assert points[("dpo", 1.0)]["trained"] and Path(first["frontier"]).is_file()

    before = files_state(tmp_path / "run"), files_state(tmp_path / "adapters")
    import adapterkit.stages
    monkeypatch.setattr(adapterkit.stages, "train_stage", lambda *a: pytest.fail(f"trained again: {a[0]}"))
    assert main(["pipeline", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    second = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name in STEPS:
        assert second["stages"][name]["reused"] is True and second["stages"][name]["registry_ref"] == f"t-{name}@1"
        assert second["stages"][name].get("score") == stages[name].get("score")  # same adapters, same scores
    assert "(reused)" in out and "time per step" in out and "plots:" in out
    after = files_state(tmp_path / "run"), files_state(tmp_path / "adapters")
    written = ("summary.json", "frontier.json", "frontier.png")  # rewritten each run, from the same adapters
    assert {k: v for k, v in after[0].items() if not k.endswith(written)} == \
        {k: v for k, v in before[0].items() if not k.endswith(written)}  # no adapter file touched
    assert {k: v for k, v in after[1].items() if "index.sqlite" not in k} == \
        {k: v for k, v in before[1].items() if "index.sqlite" not in k}  # no new registry version


def test_killed_mid_stage_then_run_again_finishes_with_every_adapter(tiny_dir, tmp_path, monkeypatch):
    """SIGKILL while DPO trains (after its first checkpoint); the rerun reuses SFT and the reward
    model, resumes DPO from its checkpoint, trains PPO: every adapter is there."""
    recipe = write_recipe(tmp_path, tiny_dir, score=False, evals=False, save_steps=1)
    killed_at = kill_when_checkpointed(["pipeline", str(recipe), "--quiet"], tmp_path / "run" / "dpo.checkpoint")
    assert killed_at >= 1 and not (tmp_path / "run" / "dpo").exists() and not (tmp_path / "run" / "ppo").exists()
    import adapterkit.stages
    trained, train_stage = {}, adapterkit.stages.train_stage

    def spy(stage, config):
        trained[stage] = config.train.resume_from
        return train_stage(stage, config)
    monkeypatch.setattr(adapterkit.stages, "train_stage", spy)
    from adapterkit.pipeline import run_pipeline
    from adapterkit.pipeline_config import load_pipeline
    summary = run_pipeline(load_pipeline(recipe, ["progress=false"]))
    assert trained == {"dpo": "latest", "ppo": None}  # SFT and reward reused, DPO resumed
    assert [summary["stages"][n]["reused"] for n in STEPS] == [True, True, False, False]
    for name in STEPS:
        assert (tmp_path / "run" / name / "adapter_model.safetensors").is_file()
        assert summary["stages"][name]["registry_ref"] == f"t-{name}@1"
    assert json.loads((tmp_path / "run" / "dpo" / "adapterkit.json").read_text())["metrics"]["steps"] == 4


@pytest.mark.parametrize("change, message", [
    ({"stages": {"dpo": {"recipe": "tiny_dpo", "parent": ["sft"]}}}, "stages.dpo.parent: 'sft' is not an earlier"),
    ({"stages": {"sft": {"recipe": "tiny_sft", "learning_rate": 1}}}, "stages.sft.learning_rate: unknown key"),
    ({"stages": {"sft": {"recipe": "tiny_sft", "overrides": ["lora.r=0"]}}}, "stages.sft (tiny_sft): config error"),
    ({"stages": {"dpo": {"recipe": "tiny_dpo", "overrides": ["dpo.parent=[x]"]}}}, "dpo.parent is the pipeline's"),
    ({"stages": {"sft": {"recipe": "tiny_sft", "overrides": ["data.train=nosuch.jsonl"]}}}, "nosuch.jsonl: no such file"),
    ({"stages": {"mine": {"recipe": "tiny_sft"}}}, "stages.mine.stage: required"),
    ({"stage": "sft"}, "stage: Input should be 'pipeline'"),
    ({"frontier": {"dpo": "sft"}}, "frontier.dpo: 'sft' is not a dpo step"),
])
def test_a_bad_pipeline_recipe_is_one_line_before_any_model_loads(change, message, tiny_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import adapterkit.base
    monkeypatch.setattr(adapterkit.base, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    recipe = {"stage": "pipeline", "out": str(tmp_path / "run"), "stages": {"sft": {"recipe": "tiny_sft"}}, **change}
    (tmp_path / "bad.yaml").write_text(json.dumps(recipe))
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_tiny_pipeline_recipe_validates_and_disk_fingerprint_is_the_loaded_ones(tiny_dir):
    """The inputs key is computed before loading (``disk_fingerprint``) and recorded after: the
    same fingerprint either way, for the causal LM and the reward model's classifier."""
    from adapterkit.base import disk_fingerprint, fingerprint, load_model, load_tokenizer
    from adapterkit.config import load_config
    from adapterkit.pipeline_config import load_pipeline
    config = load_pipeline("tiny_pipeline")
    assert list(config.stages) == list(STEPS) and config.stages["ppo"].reward == "reward"
    section = load_config("sft", "tiny_sft").base
    tokenizer = load_tokenizer(section)
    assert disk_fingerprint(section, tokenizer) == fingerprint(load_model(section), tokenizer)
    assert disk_fingerprint(section, tokenizer) == fingerprint(load_model(section, num_labels=1), tokenizer)
