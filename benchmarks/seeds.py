"""Learning across tiny bases: each seed builds another tiny base (standing in for another
CPU's float rounding), then the shipped tiny recipes run on it through the library API:
SFT -> reward -> DPO and PPO, each scored on held-out prompts by the ground-truth scorer.

    python benchmarks/seeds.py --seeds 0 1 2 3 4 --out benchmarks/results/seeds_cpu.json
    python benchmarks/seeds.py --seeds 0 1 --stages ppo --reuse DIR ppo.kl_coef=0.3

``--reuse DIR`` keeps the bases and the SFT/reward adapters in DIR between runs, so a PPO or
DPO recipe change re-runs only that stage. ``--fresh N`` also scores the DPO and PPO adapters
and their SFT parent on N prompts that no split of the seed's data holds (PPO's ``keep_best``
picks its step on ``prompts_eval``, the prompts its reported score is measured on: the fresh
score has no such selection in it). Trailing ``key=value`` words override the stage
recipes (``ppo.*`` only reaches PPO, ``dpo.*`` only DPO, ``train.*`` every stage named in
``--stages``). Not a test: it prints and writes one JSON report.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import task_overrides  # noqa: E402

STAGE_ORDER = ("sft", "reward", "dpo", "ppo")


def overrides_for(stage: str, extra: list[str]) -> list[str]:
    own = {"sft": (), "reward": ("reward.",), "dpo": ("dpo.",), "ppo": ("ppo.",)}[stage]
    return [o for o in extra if o.startswith(("train.", "lora.", *own))]


def run_seed(seed: int, root: str, stages: tuple[str, ...], extra: list[str], fresh: int = 0) -> dict:
    """One tiny base and the named stages on it; earlier stages' adapters are reused."""
    import torch
    torch.set_num_threads(1)
    from adapterkit.config import load_config
    from adapterkit.stages import train_stage
    from adapterkit.tiny import TinySpec, build_tiny
    home = Path(root) / f"seed{seed}"
    if not (home / "tiny.json").is_file():
        build_tiny(home, TinySpec(seed=seed))
    common = [f"base.name={home / 'base'}", "train.progress=false"]
    per_stage = {stage: task_overrides(home, stage, home / "sft", home / "reward") for stage in STAGE_ORDER}
    per_stage["dpo"].append(f"dpo.reward={home / 'reward'}")  # the win rate under the reward model
    out = {"seed": seed}
    for stage in STAGE_ORDER:
        adapter = home / stage
        if stage not in stages and (adapter / "adapterkit.json").is_file():
            out[stage] = json.loads((adapter / "adapterkit.json").read_text())["metrics"]
            continue
        if stage not in stages and stage in ("dpo", "ppo"):
            continue
        start = time.perf_counter()
        config = load_config(stage, f"tiny_{stage}", common + per_stage[stage] + [
            f"output.dir={adapter}", "output.overwrite=true", *overrides_for(stage, extra)])
        out[stage] = {**train_stage(stage, config).metrics, "seconds": round(time.perf_counter() - start, 1)}
    if "sft" in out and "ppo" in out:
        out["sft"]["score"] = out["ppo"].get("parent_score", out["sft"].get("score"))
    for stage, metrics in (fresh_scores(home, fresh, seed) if fresh else {}).items():
        out.setdefault(stage, {}).update(metrics)
    return out


def fresh_prompts(home: Path, n: int, seed: int) -> list:
    """``n`` tiny prompts of 2-3 words whose word tuple is in none of ``home/data``'s splits."""
    import random
    from adapterkit.tiny import WORDS, make_prompt, prompt_words
    seen = set()
    for split in home.glob("data/*.jsonl"):
        for line in split.read_text().splitlines():
            row = json.loads(line)
            turns = row.get("messages") or row["prompt"]
            seen.add(tuple(prompt_words(next(t["content"] for t in turns if t["role"] == "user"))))
    rng, out = random.Random(1_000_003 + seed), {}
    while len(out) < n:
        words = tuple(rng.sample(WORDS, rng.choice([2, 3])))
        if words not in seen:
            out[words] = [{"role": "user", "content": make_prompt(list(words))}]
    return list(out.values())


def fresh_scores(home: Path, n: int, seed: int) -> dict:
    """DPO's and PPO's score (and their SFT parent's) on ``fresh_prompts``: greedy answers, the
    tiny scorer, each stage's recipe answer length."""
    from adapterkit.adapters import load_adapters
    from adapterkit.base import load_base
    from adapterkit.config import load_config
    from adapterkit.evaluate import compare_to_parent
    from adapterkit.sections import BaseSection
    stages = [s for s in ("dpo", "ppo") if (home / s / "adapterkit.json").is_file()]
    model, tok = load_base(BaseSection(name=str(home / "base")))
    model, _ = load_adapters(model, [home / "sft", *(home / s for s in stages)], ["sft", *stages])
    prompts, out = fresh_prompts(home, n, seed), {}
    for stage in stages:
        length = getattr(load_config(stage, f"tiny_{stage}", []), stage).max_new_tokens
        metrics, _ = compare_to_parent(model, tok, prompts, ["sft", stage], ["sft"], "tiny", length)
        out[stage] = {"fresh_" + k: v for k, v in metrics.items()}
    return out


def summarise(results: list[dict]) -> dict:
    rows = {}
    pick = {"reward": "eval_accuracy", "dpo": "score", "ppo": "score"}
    for stage, key in pick.items():
        values = [r[stage][key] for r in results if stage in r and key in r[stage]]
        if values:
            rows[stage] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    for stage in ("dpo", "ppo"):
        for tag in ("", "fresh_"):
            gains = [r[stage][tag + "score"] - r[stage][tag + "parent_score"] for r in results
                     if stage in r and tag + "parent_score" in r[stage]]
            if gains:
                rows[f"{stage}_{tag}gain_over_sft"] = {"min": min(gains), "median": statistics.median(gains),
                                                       "max": max(gains)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--stages", nargs="+", default=list(STAGE_ORDER), choices=STAGE_ORDER)
    ap.add_argument("--reuse", help="keep bases and adapters here (default: a fresh temp dir)")
    ap.add_argument("--jobs", type=int, default=2, help="seeds run in parallel, one thread each")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="also score DPO, PPO and their SFT parent on N prompts no split holds")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    import tempfile
    root = args.reuse or tempfile.mkdtemp(prefix="adapterkit-seeds-")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_seed, args.seeds, [root] * len(args.seeds),
                                [tuple(args.stages)] * len(args.seeds), [args.overrides] * len(args.seeds),
                                [args.fresh] * len(args.seeds)))
    report = {"command": " ".join(sys.argv), "root": root, "results": results, "summary": summarise(results)}
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps(report["summary"], indent=2))
    for r in results:
        print(r["seed"], {s: {k: round(v, 3) for k, v in r[s].items() if k in (
            "score", "parent_score", "eval_accuracy", "kl", "fresh_score", "fresh_parent_score")
            and isinstance(v, float)}
            for s in STAGE_ORDER if s in r})


if __name__ == "__main__":
    main()
