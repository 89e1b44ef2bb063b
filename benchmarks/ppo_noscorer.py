"""PPO as a user without a scorer runs it: ``ppo.scorer=null``, so ``keep_best`` judges held-out
answers by the reward model PPO optimises. Then the task's ground truth scores the saved policy
against its SFT parent: what that selection cannot see.

    python benchmarks/ppo_noscorer.py --task reverse --seeds 0 1 2 3 4 --root ROOT [--override ppo.kl_coef=0.2]

Runs on the bases, SFT and NF4 reward adapters ``quality_vs_trl.py`` left in ``--root`` (run it
first, stages sft and reward). Run from the project root; prints one JSON line per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(task_name: str, seed: int, root: str, overrides: tuple) -> dict:
    import torch
    torch.set_num_threads(1)
    import tasks
    from quality_vs_trl import ak_run, gen_score, ppo_tag, rows
    task, home = tasks.TASKS[task_name], Path(root) / task_name / f"seed{seed}"
    out = home / f"ak_ppo_noscorer{ppo_tag(overrides)}"
    metrics = ak_run("ppo", home, task, out, ["ppo.scorer=null", *overrides])
    prompts = [r["prompt"] for r in rows(home / "data/prompts_eval.jsonl")]
    truth = gen_score(str(home / "base"), "nf4", [str(home / "ak_sft"), str(out)], prompts, task.SCORER)
    sft = json.loads((home / "results.json").read_text())["sft_ak_score"]["score"]
    return {"task": task_name, "seed": seed, "overrides": list(overrides), "truth": truth, "sft": sft,
            "gain": truth - sft, **{k: metrics.get(k) for k in ("best_step", "kl", "train_kl")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="reverse")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--root", default="/tmp/adapterkit-quality")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    n = len(args.seeds)
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(run, [args.task] * n, args.seeds, [args.root] * n, [tuple(args.override)] * n):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
