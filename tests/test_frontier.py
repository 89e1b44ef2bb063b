"""Reward against KL (``adapterkit frontier``): points, JSON and PNG, reuse, refusals.

Few training steps: what is tested is the frontier's wiring and that every point is measured
alike, not where the points land (benchmarks/results/frontier_tiny_cpu.json has a real run)."""
from __future__ import annotations

import json

import pytest

from adapterkit import frontier
from adapterkit.cli import main

DPO = ["train.max_steps=2"]
PPO = ["train.max_steps=1", "ppo.rollout_batch_size=16", "train.grad_accum=1", "ppo.ppo_epochs=1"]


@pytest.fixture(scope="module")
def short_sft(tiny_dir, tmp_path_factory):
    """A parent adapter in a few steps (the frontier needs one, not a good one)."""
    from adapterkit.config import load_config
    from adapterkit.stages.sft import train_sft
    out = tmp_path_factory.mktemp("frontier-sft") / "sft"
    return str(train_sft(load_config("sft", "tiny_sft", [f"output.dir={out}", "train.max_steps=6",
                                                         "train.progress=false"])).path)


@pytest.fixture(scope="module")
def first_run(short_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier") / "run"
    result = frontier.run_frontier(out, betas=[0.1, 1.0], kl_coefs=[0.05], parent=[short_sft], reward="tiny",
                                   dpo_overrides=DPO, ppo_overrides=PPO, progress=False)
    return out, result


def test_one_curve_per_method_measured_alike(first_run):
    out, result = first_run
    assert json.loads((out / "frontier.json").read_text()) == result and result["complete"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = sorted((p["method"], p["coef_name"], p["coef"]) for p in result["points"])
    assert got == [("dpo", "beta", 0.1), ("dpo", "beta", 1.0), ("ppo", "kl_coef", 0.05)]
    assert all(p["trained"] and p["kl"] >= 0 and 0 <= p["score"] <= 1 for p in result["points"])
    # the same prompts, decoding and scorer for both stages: their parents' scores agree exactly
    assert len({p["parent_score"] for p in result["points"]}) == 1
    assert result["measure"]["max_new_tokens"] == 8  # tiny_ppo's answer length, DPO's too here
    for p in result["points"]:
        manifest = json.loads((out / f"{p['method']}-{p['coef_name']}{p['coef']:g}" / "adapterkit.json").read_text())
        assert manifest["recipe"][p["method"]][p["coef_name"]] == p["coef"]
        assert manifest["metrics"]["score"] == p["score"]


def test_given_points_are_reused_not_retrained(first_run, short_sft, tmp_path, monkeypatch):
    out, result = first_run
    dpo = next(p for p in result["points"] if p["method"] == "dpo" and p["coef"] == 0.1)

    def no_training(*args):
        raise AssertionError("a given point was trained again")
    monkeypatch.setattr(frontier, "train_point", no_training)
    again = frontier.run_frontier(tmp_path / "again", betas=[0.1], kl_coefs=[], parent=[short_sft],
                                  dpo_overrides=DPO, points=[dpo["adapter"]], progress=False)
    [point] = again["points"]
    assert not point["trained"] and (point["score"], point["kl"]) == (dpo["score"], dpo["kl"])
    assert (tmp_path / "again" / "frontier.png").is_file()
    with pytest.raises(frontier.ConfigError, match="dpo.loss_type=sigmoid"):  # another curve's point
        frontier.run_frontier(tmp_path / "ipo", betas=[0.1], kl_coefs=[], parent=[short_sft],
                              dpo_overrides=[*DPO, "dpo.loss_type=ipo"], points=[dpo["adapter"]], progress=False)


def test_remeasure_is_the_stages_measurement(first_run, short_sft):
    """A given point scored another way is re-measured with compare_to_parent, as the stages do:
    on a point measured the frontier's way it gives the stage's own numbers back."""
    from adapterkit.config import load_config
    out, result = first_run
    ppo = next(p for p in result["points"] if p["method"] == "ppo")
    base = load_config("ppo", "tiny_ppo").base
    measure = frontier.Measure(**result["measure"])
    again = frontier.remeasure(frontier.Path(ppo["adapter"]), [short_sft], measure, base)
    assert again["score"] == pytest.approx(ppo["score"], abs=1e-6)
    assert again["kl"] == pytest.approx(ppo["kl"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("argv, says", [
    (["--betas", "0.1,x"], "comma-separated numbers"),
    (["--betas", "-1", "--kl-coefs", ""], "betas must be numbers >= 0"),
    (["--betas", "", "--kl-coefs", ""], "run `adapterkit sft tiny_sft` first"),
])
def test_bad_arguments_one_line_exit_2(argv, says, tmp_path, monkeypatch, capsys, ak_home):
    monkeypatch.chdir(tmp_path)  # no runs/tiny here
    if "-1" in argv:
        argv = [*argv, "--parent", "runs/x"]
    assert main(["frontier", "--out", "f", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_refuses_an_out_folder_it_did_not_make(tmp_path, capsys, ak_home):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["frontier", "--out", str(tmp_path), "--parent", "x", "--reward", "tiny"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not (tmp_path / "frontier.json").exists()
