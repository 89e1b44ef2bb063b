"""Every stage through ``accelerate launch`` with the shipped single-GPU config, against the
same stage run directly (``python -m adapterkit STAGE RECIPE``), on the tiny default (a base
built from config):

    python benchmarks/launch_check.py [--out benchmarks/results/launch_check_<card>.json]

The two sides of a stage run at the same time, in their own processes, with the same recipe
and overrides; DPO and PPO stack on the direct side's SFT adapter and PPO scores with its
reward adapter, so each pair differs only in the launcher. Reported per stage and side: exit
status, wall seconds, the stage's own metrics, and the largest relative gap between the two
sides' numeric metrics (the launcher adds nothing to the training, so the gap should be at
the level of run-to-run kernel nondeterminism).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import scratch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward", "dpo", "ppo")


def start(side: str, stage: str, overrides: list[str], out: Path) -> tuple[subprocess.Popen, float]:
    from adapterkit.distributed import launch_config
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config("single_gpu"))]
                if side == "launched" else [sys.executable])
    cmd = [*launcher, "-m", "adapterkit", stage, f"tiny_{stage}", *overrides, f"output.dir={out}", "--json", "--quiet"]
    # this checkout first, then the caller's PYTHONPATH (tests/helpers.child_env's rule; no empty
    # entry, which would put the working directory on the path)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.perf_counter()


def finish(proc: subprocess.Popen, began: float) -> dict:
    stdout, stderr = proc.communicate()
    result = {"exit_status": proc.returncode, "wall_s": round(time.perf_counter() - began, 1)}
    if proc.returncode == 0:
        result.update(json.loads(stdout))
    else:
        result["stderr_tail"] = stderr[-2000:]
    return result


def largest_gap(a: dict, b: dict) -> float | None:
    keys = [k for k, v in a.items() if isinstance(v, (int, float)) and isinstance(b.get(k), (int, float))]
    gaps = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in keys if k not in ("runtime_s", "seconds")]
    return max(gaps) if gaps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the report to this JSON file")
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    import torch
    from adapterkit.tiny import ensure_tiny
    ensure_tiny()  # built once, before the sides start (they read it)
    work = Path(scratch())
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": card, "torch": torch.__version__, "stages": {}}
    parents: dict[str, str] = {}
    waves = [[s] for s in ("sft", "reward")] + [["dpo", "ppo"]]
    for wave in waves:
        running = {}
        for stage in [s for s in wave if s in args.stages.split(",")]:
            own = {"dpo": [f"dpo.parent=[{parents.get('sft')}]"],
                   "ppo": [f"ppo.parent=[{parents.get('sft')}]", f"ppo.reward={parents.get('reward')}"]}.get(stage, [])
            for side in ("direct", "launched"):
                running[stage, side] = start(side, stage, own, work / stage / side)
        for (stage, side), (proc, began) in running.items():
            entry = report["stages"].setdefault(stage, {})
            entry[side] = finish(proc, began)
            if side == "direct" and entry[side]["exit_status"] == 0:
                parents[stage] = entry[side]["adapter"]
        for stage in {s for s, _ in running}:
            entry = report["stages"][stage]
            if entry["direct"]["exit_status"] == entry["launched"]["exit_status"] == 0:
                entry["largest_metric_gap"] = largest_gap(entry["launched"]["metrics"], entry["direct"]["metrics"])
            print(f"{stage}: direct exit {entry['direct']['exit_status']} {entry['direct']['wall_s']} s, launched exit "
                  f"{entry['launched']['exit_status']} {entry['launched']['wall_s']} s, largest metric gap "
                  f"{entry.get('largest_metric_gap')}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    failed = [s for s, e in report["stages"].items() if any(e[side]["exit_status"] for side in ("direct", "launched"))]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
