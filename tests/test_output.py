"""What a user reads: ``--json`` is one JSON document on stdout for every stage, the default
output is one progress bar per stage (no raw log dicts, no library loading bars), and the
tables show each stage against its parent, a regression in red with its reason."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapterkit.cli import main
from helpers import child_env

ROOT = Path(__file__).resolve().parents[1]
RAW = ("{'loss'", "{'train_runtime'", "{'eval_loss'", "Loading weights")


def test_sft_json_pipes_into_json_load(tiny_dir, tmp_path):
    """``adapterkit sft ... --json | python -c "import json,sys; json.load(sys.stdin)"``, with
    the progress bar on (the default)."""
    train = subprocess.Popen([sys.executable, "-m", "adapterkit", "sft", "tiny_sft", "train.max_steps=2",
                              "train.logging_steps=1", "data.eval=null", f"output.dir={tmp_path / 'sft'}", "--json"],
                             cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    check = subprocess.run([sys.executable, "-c", "import json,sys; print(json.load(sys.stdin)['adapter'])"],
                           stdin=train.stdout, capture_output=True, text=True)
    train.stdout.close()
    err = train.stderr.read().decode()
    assert train.wait() == 0 and check.returncode == 0, err[-2000:] + check.stderr
    assert check.stdout.strip() == str(tmp_path / "sft")
    assert not any(raw in err for raw in RAW), err[-2000:]  # the bar, not dicts or loading bars


@pytest.mark.parametrize("stage", ["reward", "dpo", "ppo"])
def test_every_stage_prints_one_json_document(stage, sft_adapter, reward_adapter, tmp_path, capsys):
    parent = f"{stage}.parent={json.dumps([str(sft_adapter.path)])}"
    extra = {"reward": ["train.max_steps=2"],
             "dpo": ["train.max_steps=2", "dpo.prompts=null", parent],
             "ppo": ["train.max_steps=1", "ppo.rollout_batch_size=8", "train.batch_size=4", "ppo.ppo_epochs=1",
                     "ppo.keep_best=false", "ppo.eval_every=0", parent, f"ppo.reward={reward_adapter.path}"]}[stage]
    code = main([stage, f"tiny_{stage}", "data.eval=null", "train.logging_steps=1", *extra,
                 f"output.dir={tmp_path / stage}", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    result = json.loads(out)  # nothing else on stdout
    assert result["adapter"] == str(tmp_path / stage) and result["metrics"]["steps"] >= 1
    assert not any(raw in out + err for raw in RAW)


def test_quiet_flag_turns_the_bar_off():
    from adapterkit.cli import build_parser
    args = build_parser().parse_args(["sft", "tiny_sft", "--quiet"])
    assert args.quiet


def test_table_marks_a_regression_against_the_parent_in_red():
    from rich.console import Console
    from adapterkit.cli import stage_table
    from adapterkit.quickstart import change, regression
    stages = {"base": {"score": 0.30}, "sft": {"adapter": "runs/sft", "parent": "base", "score": 0.60},
              "reward": {"adapter": "runs/reward", "accuracy": 0.9},
              "dpo": {"adapter": "runs/dpo", "parent": "sft", "score": 0.70, "kl": 0.1},
              "ppo": {"adapter": "runs/ppo", "parent": "sft", "score": 0.50, "kl": 0.4}}
    assert change(stages, "sft") == pytest.approx(0.30) and change(stages, "reward") is None
    assert regression(stages, "dpo") is None
    assert regression(stages, "ppo") == "held-out score 0.500 is below its parent sft's 0.600"
    import io
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    console.print(stage_table(stages, "t"))
    text = console.file.getvalue()
    assert "+0.300 vs base" in text and "held-out KL=0.400" in text
    assert "\x1b[31m-0.100 vs sft  worse: held-out score 0.500 is below its parent sft's 0.600" in text  # red
    assert "\x1b[31m+0.100" not in text


def test_seconds_per_step_is_not_a_dict(tmp_path, capsys, monkeypatch):
    import adapterkit.quickstart as qs
    monkeypatch.setattr(qs, "run_quickstart", lambda out, progress, on_step: {
        "stages": {"base": {"score": 0.25}}, "seconds": {"base": 0.2}})
    assert main(["quickstart", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "time per step: base 0 s" in out and "{" not in out.split("time per step")[1]


def test_hub_base_offline_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    import adapterkit.preflight as preflight
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sft", "tiny_sft", "base.name=nosuch-org/nosuch-model", f"output.dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("base 'nosuch-org/nosuch-model': cannot load its tokenizer or weights: a hub model that is not in "
            "the local cache, and the hub is offline") in err
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)  # online by the flags, but no network: no minute of retries
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout=3.0: False)
    assert main(["sft", "tiny_sft", "base.name=nosuch-org/nosuch-model", f"output.dir={tmp_path / 'x'}"]) == 2
    assert "the hub cannot be reached" in capsys.readouterr().err
