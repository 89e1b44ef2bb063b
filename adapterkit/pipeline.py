"""``adapterkit pipeline RECIPE``: the steps of a pipeline recipe (``pipeline_config.py``), in
order, each wired to the adapters of the steps before it, then the finishing steps.

For each step, before anything loads, its inputs are hashed (``inputs.stage_inputs``: data,
base, resolved config, parents). A registry entry with the same inputs is **reused**, not
retrained; so is the step's own folder when a run stopped between saving it and publishing
it. Otherwise the stage trains, resuming from its own checkpoints when a run of the same
inputs was killed (``train.save_steps``), and is published at once: the registry is the
pipeline's memory. Each policy is scored on held-out prompts (``score``), and the summary
(``<out>/summary.json``) holds the stage table's rows, the plots and the time per step.

Finishing steps are functions in ``FINISH``: ``publish`` (the profile) and ``frontier``
(reward against KL from the DPO/PPO steps' parent, ``frontier.py``), each with its section.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adapterkit.artifact import read_manifest
from adapterkit.config import StageConfig
from adapterkit.errors import AdapterkitError, OutputError
from adapterkit.pipeline_config import POLICY, PipelineConfig, stage_config
from adapterkit.registry import Entry, Registry

log = logging.getLogger("adapterkit")
MARKER = "pipeline-inputs.json"  # in a step's checkpoint folder: the inputs its checkpoints are of
HELP = {"base": "score the base on the held-out prompts", "sft": "supervised fine-tuning",
        "reward": "a reward model on preference pairs", "dpo": "DPO", "ppo": "PPO",
        "publish": "set the profile to the best-scoring policy and its parents",
        "frontier": "reward against KL: DPO and PPO at more coefficients from the same parent"}
# What the table shows of each stage's metrics, beside the score: row key -> metric.
REPORTED = {"sft": {"eval_loss": "eval_loss"}, "reward": {"accuracy": "eval_accuracy"},
            "dpo": {"kl": "kl", "win_rate": "win_rate"}, "ppo": {"kl": "kl"}}


@dataclass
class Run:
    """One pipeline run: its config (``out`` resolved), registry and what the steps produced."""
    config: PipelineConfig
    registry: Registry
    on_step: Callable[[str, str], None] | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # step -> its adapter folder
    refs: dict[str, str] = field(default_factory=dict)      # step -> its registry ref
    summary: dict = field(default_factory=lambda: {"stages": {}})
    _prompts: list | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def prompts(self) -> list:
        """The score's held-out prompts, read (and checked) once."""
        if self._prompts is None:
            from adapterkit.data import read_rows, validate_rows
            source = self.config.score.prompts
            rows = read_rows(source)
            validate_rows(rows, "prompt", source, ("prompt",))
            self._prompts = [r["prompt"] for r in rows]
        return self._prompts


def run_pipeline(config: PipelineConfig, on_step: Callable[[str, str], None] | None = None) -> dict:
    """Run every step, then the finishing steps; returns (and writes) the summary."""
    config = config.model_copy(update={"out": str(Path(config.out).expanduser().resolve())})
    run = Run(config, Registry.open(config.publish.registry), on_step)
    check_all(run)  # every step's checks before the first model loads
    seconds = {}
    steps: list[tuple[str, Callable[[Run], None]]] = []
    if config.score.scorer is not None:
        steps.append(("base", score_base))
    steps += [(name, lambda r, n=name: run_step(r, n)) for name in config.stages]
    steps += list(FINISH.items())
    for name, step in steps:
        if on_step:
            kind = config.stages[name].stage if name in config.stages else name
            on_step(name, HELP.get(kind, kind))
        start = time.perf_counter()
        step(run)
        seconds[name] = round(time.perf_counter() - start, 1)
    run.summary["plots"] = [str(p) for name in config.stages for p in sorted(Path(run.adapters[name]).glob("*.png"))]
    run.summary["plots"] += [run.summary["frontier"]] if "frontier" in run.summary else []
    run.summary["seconds"] = seconds
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "summary.json").write_text(json.dumps(run.summary, indent=2))
    return run.summary


def check_all(run: Run) -> None:
    """What can be checked before any model loads, for every step: its output folder, checkpoint
    settings, base and data; the score's function and prompts."""
    from adapterkit import preflight
    planned = {name: str(run.out / name) for name in run.config.stages}
    for name in run.config.stages:
        config = stage_config(run.config, name, planned)
        for check in (preflight.check_output, preflight.check_training, preflight.check_base, preflight.check_data):
            check(config)
    if run.config.score.scorer is not None:
        from adapterkit.rewards import load_function
        load_function(run.config.score.scorer)
        run.prompts()


def run_step(run: Run, name: str) -> None:
    """Reuse, resume or train step ``name``; publish it; add its row to the summary."""
    from adapterkit.inputs import holds, stage_inputs
    step = run.config.stages[name]
    config = stage_config(run.config, name, run.adapters)
    key = stage_inputs(config)["sha256"]
    own = Path(config.output.dir)
    entry = find_entry(run, name, step.stage, key)
    reused = entry is not None or holds(own, key)
    if entry is not None:
        path = own if holds(own, key) and read_manifest(own)["files"].get("adapter_model.safetensors") \
            == entry.weights_sha256 else entry.path
        log.info("%s: reusing %s (same inputs %s)", name, entry.ref, key[:12])
    else:
        if not reused:
            from adapterkit.stages import train_stage
            resume = resumable(config, key)
            config = stage_config(run.config, name, run.adapters, resume=resume) if resume else config
            recorded = train_stage(step.stage, config).manifest.get("inputs", {}).get("sha256")
            if recorded != key:  # the next run could not reuse it: say so, do not hide it
                log.warning("%s: the inputs the stage recorded (%s) are not the ones computed before it "
                            "(%s); a rerun will train it again", name, str(recorded)[:12], key[:12])
        path = own
        entry = publish(run, name, own, config.output.domain)
    run.adapters[name], run.refs[name] = str(path), entry.ref
    manifest = read_manifest(path)
    row = {"adapter": str(path)}
    if step.stage in POLICY:
        row["parent"] = step.parent[-1] if step.parent else "base"
        if run.config.score.scorer is not None:
            row["score"] = score_stack(run, config, serving_dirs(run, entry.ref))
    metrics = manifest.get("metrics", {})
    row.update({k: metrics[m] for k, m in REPORTED.get(step.stage, {}).items() if m in metrics})
    row.update(reused=reused, registry_ref=entry.ref)
    run.summary["stages"][name] = row


def find_entry(run: Run, name: str, stage: str, key: str) -> Entry | None:
    """The registry entry of these inputs, verified: the step's own name first, newest first."""
    own = f"{run.config.publish.prefix}{name}"
    found = [e for e in run.registry.list(stage=stage) if (e.manifest.get("inputs") or {}).get("sha256") == key]
    if not found:
        return None
    best = sorted(found, key=lambda e: (e.name == own, e.version))[-1]
    return run.registry.verify(best.ref)  # a changed file is an error, named, never a silent retrain


def publish(run: Run, name: str, folder: Path, domain: str) -> Entry:
    """Publish a step's adapter as ``<prefix><name>``, in the pipeline's domain (else ``domain``,
    the stage's)."""
    p = run.config.publish
    return run.registry.publish(folder, name=f"{p.prefix}{name}", domain=p.domain or domain)


def resumable(config: StageConfig, key: str) -> bool:
    """Whether the step goes on from its checkpoints: those of a killed run of the same inputs
    (``MARKER`` says so). Checkpoints of other inputs that a pipeline wrote are removed (only
    ``checkpoint-<step>`` folders); ones it did not write are refused, never taken over."""
    from adapterkit.checkpoints import checkpoints, complete
    folder = config.checkpoint_dir
    found, marker = checkpoints(folder), folder / MARKER
    recorded = json.loads(marker.read_text()).get("inputs") if marker.is_file() else None
    if found and recorded == key and any(complete(p) for p in found):
        return True
    if found and recorded is None:
        raise OutputError(f"{folder}: holds checkpoints that this pipeline did not write; move them away "
                          "(the step would train from scratch and write its own there)")
    for stale in found:
        log.warning("%s: removing a checkpoint of other inputs (or an incomplete one)", stale)
        shutil.rmtree(stale)
    if config.train.save_steps:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"inputs": key}))
    return False


def serving_dirs(run: Run, ref: str) -> list[str]:
    """The adapter folders a policy is served (and scored) with: its parents, then itself."""
    from adapterkit.lineage import serving_stack
    return [str(run.registry.get(r).path) for r in serving_stack(run.registry, ref)]


def score_stack(run: Run, config: StageConfig, adapter_dirs: list[str]) -> float:
    """The score's mean over the held-out prompts of the greedy answers of base + adapters."""
    from adapterkit.adapters import activate, load_adapters
    from adapterkit.base import load_base
    from adapterkit.evaluate import mean_score
    model, tokenizer = load_base(config.base)
    if adapter_dirs:
        model, _ = load_adapters(model, adapter_dirs)
        activate(model, list(model.peft_config))
    score, _ = mean_score(model, tokenizer, run.prompts(), run.config.score.scorer)
    return score


def score_base(run: Run) -> None:
    first = next(iter(run.config.stages))
    config = stage_config(run.config, first, {n: str(run.out / n) for n in run.config.stages})
    run.summary["stages"]["base"] = {"score": score_stack(run, config, [])}


def finish_publish(run: Run) -> None:
    """``publish.profile``: set to the best-scoring policy's serving stack (on a tie, the later
    step), with the lineage tree in the summary."""
    from adapterkit.lineage import lineage, serving_stack, tree_lines
    from adapterkit.profiles import set_profile
    run.summary["registry"] = str(run.registry.root)
    stages, p = run.summary["stages"], run.config.publish
    policies = [(stages[n].get("score") or 0.0, i, ref) for i, (n, ref) in enumerate(run.refs.items())
                if run.registry.get(ref).stage != "reward"]
    if p.profile is None or not policies:
        return
    top = max(policies)[2]
    domain = p.domain or run.registry.get(top).domain
    profile = set_profile(run.registry, p.profile, serving_stack(run.registry, top), domain=domain)
    run.summary["profile"] = profile.name
    run.summary["registry_tree"] = tree_lines(lineage(run.registry, top))


def finish_frontier(run: Run) -> None:
    """``frontier``: DPO at ``betas`` and PPO at ``kl_coefs`` on the steps' parent, recipe and
    reward, in ``<out>/frontier``; the steps themselves are points, and a point trained by an
    earlier run on the same inputs is reused (``frontier.run_frontier``)."""
    f = run.config.frontier
    steps = {m: run.config.stages[s] for m, s in (("dpo", f.dpo), ("ppo", f.ppo)) if s}
    if not steps:
        return
    from adapterkit.frontier import run_frontier
    first = next(iter(steps.values()))
    ppo = steps.get("ppo")
    recipes = {f"{m}_recipe": step.recipe for m, step in steps.items()}
    result = run_frontier(
        run.out / "frontier", betas=f.betas if "dpo" in steps else [], kl_coefs=f.kl_coefs if ppo else [],
        parent=[run.adapters[p] for p in first.parent],
        reward=run.adapters[ppo.reward] if ppo and ppo.reward else None, **recipes,
        overrides=run.config.overrides, dpo_overrides=steps["dpo"].overrides if "dpo" in steps else [],
        ppo_overrides=ppo.overrides if ppo else [], prompts=run.config.score.prompts,
        scorer=run.config.score.scorer, points=[run.adapters[s] for s in (f.dpo, f.ppo) if s],
        progress=run.config.progress)
    run.summary["frontier"] = result["plot"]


FINISH: dict[str, Callable[[Run], None]] = {"publish": finish_publish, "frontier": finish_frontier}
