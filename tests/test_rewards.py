"""Reward functions (trl's GRPO signature): names, module:function refs, and the checks on
what they return; and their use as PPO's reward and as held-out scorers in configs."""
from __future__ import annotations

import pytest

from adapterkit import rewards, tiny
from adapterkit.config import dump_config, load_config
from adapterkit.errors import ConfigError


def constant(prompts, completions, **kwargs):
    return [0.5] * len(prompts)


def test_a_name_and_a_module_function_load_the_same_callable():
    assert rewards.load_function("tiny") is tiny.reward
    assert rewards.load_function("adapterkit.tiny:reward") is tiny.reward
    assert rewards.load_function(constant) is constant


def test_completions_follow_the_prompt_format():
    chat = [{"role": "user", "content": "flip: hot up"}]
    assert rewards.score_completions(tiny.reward, [chat, "flip: hot up"], ["cold down", "cold up"]) == [1.0, 0.5]
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen["completions"] = completions
        return [0.0] * len(prompts)
    rewards.score_completions(spy, [chat, "text prompt"], ["a", "b"])
    assert seen["completions"] == [[{"role": "assistant", "content": "a"}], "b"]


@pytest.mark.parametrize("ref, match", [
    ("no_such_module_xyz:fn", "cannot import"),
    ("adapterkit.tiny:no_such_function", "cannot import"),
    ("adapterkit.tiny:WORDS", "not callable"),
])
def test_bad_references_are_one_clear_error(ref, match):
    with pytest.raises(ConfigError, match=match):
        rewards.load_function(ref)


def test_a_module_in_the_working_directory_loads_as_from_python_m(tmp_path, monkeypatch):
    """The console script does not put the working directory on sys.path; a user's own
    ``my_rewards.py`` there must load all the same (and a missing one says where it looked)."""
    import sys
    (tmp_path / "my_rewards_xyz.py").write_text("def judge(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = rewards.load_function("my_rewards_xyz:judge")
    assert fn(prompts=["a"], completions=["b"]) == [1.0]
    monkeypatch.delitem(sys.modules, "my_rewards_xyz")
    with pytest.raises(ConfigError, match="working directory"):
        rewards.load_function("my_rewards_missing_xyz:judge")


@pytest.mark.parametrize("returned", [None, [0.1], [1.0, float("nan")], ["high", "low"]])
def test_a_function_returning_the_wrong_thing_is_named(returned):
    with pytest.raises(ConfigError, match="reward function"):
        rewards.score_completions(lambda prompts, completions: returned, ["a", "b"], ["x", "y"])


def test_an_exception_inside_a_function_is_named_as_the_functions():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")
    with pytest.raises(ConfigError, match=r"reward function .*broken raised KeyError: 'answer' \(adapterkit -v"):
        rewards.score_completions(broken, ["a"], ["x"])


def test_a_scorer_for_another_task_fails_before_any_model_loads(tiny_dir, tmp_path):
    """Tried on the first prompts of each split it will score: ``ppo.scorer=tiny`` on another
    task's prompts stops the run at once, naming the key and the split."""
    import json
    from adapterkit.preflight import check_functions
    other = tmp_path / "prompts.jsonl"
    other.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"double: {i}"}]}) + "\n"
                             for i in range(1, 6)))
    config = load_config("ppo", "tiny_ppo", [f"data.train={other}", "ppo.scorer=tiny"])
    with pytest.raises(ConfigError, match=r"ppo.scorer: tried on the first 4 prompts of data.train=.*not a flip prompt"):
        check_functions(config)
    config.ppo.scorer = constant  # a function for any prompt passes, as the tiny scorer on its own task
    check_functions(config)
    check_functions(load_config("ppo", "tiny_ppo", ["ppo.reward=tiny"]))
    check_functions(load_config("dpo", "tiny_dpo", []))


def test_config_takes_functions_for_reward_and_scorer_and_writes_them_as_text():
    config = load_config("ppo", "tiny_ppo", ["ppo.reward=adapterkit.tiny:reward", "ppo.scorer=tiny"])
    assert rewards.is_function_ref(config.ppo.reward) and config.ppo.value_init is None
    config.ppo.reward = constant  # the Python API: the callable itself
    assert f"reward: {__name__}:constant" in dump_config(config)


@pytest.mark.parametrize("overrides, match", [
    (["ppo.reward=adapterkit.tiny:reward", "ppo.value_init=reward"], "value_init=fresh"),
    (["ppo.scorer=not a function"], "ppo.scorer"),
    (["dpo.scorer=runs/tiny/reward"], "dpo.scorer"),
    (["ppo.eval_every=0"], "eval_every"),  # the tiny recipe keeps the best evaluation
    (["ppo.patience=2", "ppo.eval_every=0", "ppo.keep_best=false"], "eval_every"),
])
def test_config_refuses_what_cannot_work(overrides, match):
    stage = "dpo" if overrides[0].startswith("dpo.") else "ppo"
    with pytest.raises(ConfigError, match=match):
        load_config(stage, f"tiny_{stage}", overrides)
