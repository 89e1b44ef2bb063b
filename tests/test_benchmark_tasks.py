"""The benchmarks' task families (benchmarks/tasks.py), whose numbers the README quotes: each
builds its splits, and its ground-truth scorer prefers every chosen answer to its rejected one.
The model build itself (a minute of pretraining) is stubbed."""
from __future__ import annotations

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import tasks  # noqa: E402


@pytest.mark.parametrize("name, data, reward", [
    ("reverse", tasks._reverse_data, tasks.reverse_reward),
    ("double", tasks._double_data, tasks.double_reward),
])
def test_a_list_task_builds_and_its_scorer_agrees_with_its_pairs(name, data, reward, tmp_path, monkeypatch):
    import adapterkit.tiny
    seen = {}

    def stub(tmp, spec, texts, rows):
        seen.update(texts=texts, rows=rows)
        return {}
    monkeypatch.setattr(adapterkit.tiny, "write_task_build", stub)
    tasks.TASKS[name].build(tmp_path / name, 0)
    rows = seen["rows"]
    assert rows == data(0) and (tmp_path / name / "task.json").is_file()
    assert {k: len(v) for k, v in rows.items()} == {"sft": 1200, "sft_eval": 128, "preferences": 1200,
                                                   "preferences_eval": 128, "prompts": 256, "prompts_eval": 128}
    held = {r["prompt"][0]["content"] for r in rows["prompts_eval"]}
    assert not held & {r["prompt"][0]["content"] for r in rows["prompts"]}  # held out means held out
    pairs = rows["preferences"] + rows["preferences_eval"]
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = reward(prompts, [p["chosen"] for p in pairs]), reward(prompts, [p["rejected"] for p in pairs])
    assert set(chosen) == {1.0} and max(rejected) < 1.0
    sft = rows["sft"]
    right = reward([r["messages"][:1] for r in sft], [r["messages"][1:] for r in sft])
    assert 0.15 < sum(s == 1.0 for s in right) / len(sft) < 0.6  # the demonstrator's mistake leaves a job
