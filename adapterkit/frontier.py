"""Reward against KL: DPO at several ``dpo.beta`` and PPO at several ``ppo.kl_coef`` from one
parent, each point's held-out score against its KL to the parent, one curve per method (the
picture of Rafailov et al. 2023, Fig. 2 left).

    run_frontier("runs/frontier")    # the tiny recipes, their parent and reward, DEFAULT_BETAS / DEFAULT_KL_COEFS
    run_frontier("runs/f", betas=[0.1], kl_coefs=[0.2, 1.0], points=["runs/tiny/dpo"])  # one point reused

Every point is an adapter trained by its stage's own function (``train_dpo``, ``train_ppo``)
and measured by the stage's own held-out evaluation (``evaluate.compare_to_parent``: greedy
answers of policy and parent, the scorer's mean, the exact per-token KL on the policy's
answers). The frontier pins what those numbers depend on - the prompts, the scorer and the
answer length - to one ``Measure`` for both stages, so the two curves are measured alike; the
parent is the point at KL 0 (every point measures it as ``parent_score``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from adapterkit import rewards
from adapterkit.errors import ConfigError, OutputError

COEFFICIENTS = {"dpo": "beta", "ppo": "kl_coef"}  # method -> the coefficient the frontier varies
LABELS = {"dpo": "DPO (beta)", "ppo": "PPO (kl_coef)"}
# The tiny recipes' own coefficients (a pipeline passes its DPO and PPO adapters as those points)
# and one stronger pull to the parent each: benchmarks/results/frontier_tiny_cpu.json.
DEFAULT_BETAS = (0.1, 1.0)
DEFAULT_KL_COEFS = (0.05, 1.0)
MARK = "frontier.json"  # a folder holding it was made by ``run_frontier`` (and may be re-run)


@dataclass(frozen=True)
class Measure:
    """How every point is scored: held-out prompts (a data file or scheme), a reward function
    (``module:function`` or a registered name) and greedy answers of ``max_new_tokens``."""
    prompts: str
    scorer: str
    max_new_tokens: int

    def dpo(self) -> list[str]:
        return [f"dpo.prompts={json.dumps(self.prompts)}", f"dpo.scorer={json.dumps(self.scorer)}",
                f"dpo.max_new_tokens={self.max_new_tokens}"]

    def ppo(self) -> list[str]:
        return [f"data.eval={json.dumps(self.prompts)}", f"ppo.scorer={json.dumps(self.scorer)}",
                f"ppo.max_new_tokens={self.max_new_tokens}"]

    def recorded(self, method: str, recipe: dict, folder: Path) -> "Measure":
        """The measure an adapter's recorded recipe used (paths resolved from its folder)."""
        from adapterkit.artifact import recorded_path
        section = recipe[method]
        prompts = section.get("prompts") if method == "dpo" else recipe["data"].get("eval")
        return Measure(same_path(recorded_path(folder, prompts)) if prompts else "",
                       str(section.get("scorer")), section["max_new_tokens"])


def same_path(value: str) -> str:
    """A path that exists, absolute (so two spellings of one file compare equal); else as given."""
    return str(Path(value).resolve()) if os.path.exists(value) else value


@dataclass
class Point:
    """One adapter on the frontier: its method, coefficient and held-out measurements."""
    method: str          # dpo | ppo
    coef: float          # dpo.beta or ppo.kl_coef
    score: float         # mean scorer value of the policy's greedy answers
    kl: float            # mean per-token KL(policy || parent) on those answers
    parent_score: float  # the parent's, measured in the same run
    adapter: str
    trained: bool        # False: given (reused), not trained by this frontier
    seconds: float | None = None      # wall-clock training + evaluation time (None: given)
    cpu_seconds: float | None = None  # this process's CPU time for it (a shared machine's wall clock varies)
    best_step: int | None = None  # PPO with ppo.keep_best: the step it kept (selected on the same prompts)

    @property
    def coef_name(self) -> str:
        return COEFFICIENTS[self.method]


# -- configs -----------------------------------------------------------------------------------

def stage_config(method: str, recipe: str, overrides: list[str]):
    from adapterkit.config import load_config
    return load_config(method, recipe, overrides)


def resolve_measure(dpo, ppo, prompts: str | None, scorer: str | None, max_new_tokens: int | None) -> Measure:
    """The frontier's measure: the arguments, else the PPO recipe's (held-out prompts, scorer,
    answer length: PPO trains at that length), else the DPO recipe's."""
    recipes = [c for c in (ppo, dpo) if c is not None]
    own = [((c.data.eval if c.stage == "ppo" else c.dpo.prompts), getattr(c, c.stage).scorer,
            getattr(c, c.stage).max_new_tokens) for c in recipes]
    prompts = prompts or next((p for p, _, _ in own if p), None)
    scorer = scorer if scorer is not None else next((s for _, s, _ in own if s is not None), None)
    if not prompts:
        raise ConfigError("frontier: no held-out prompts (set --prompts FILE, or data.eval in the PPO "
                          "recipe / dpo.prompts in the DPO recipe)")
    if scorer is None:
        raise ConfigError("frontier: no scorer to measure the points with (set --scorer module:function, "
                          "or ppo.scorer / dpo.scorer in the recipes)")
    rewards.load_function(scorer)  # one that does not import fails now
    return Measure(same_path(prompts), rewards.describe(scorer),
                   max_new_tokens or own[0][2])


def recipe_value(configs: list, key: str, arg):
    """``parent`` / ``reward``: the argument, else the recipes' (which must agree)."""
    if arg is not None:
        return arg
    values = {json.dumps(getattr(getattr(c, c.stage), key), default=str) for c in configs
              if key in type(getattr(c, c.stage)).model_fields}
    if len(values) > 1:
        raise ConfigError(f"frontier: the DPO and PPO recipes name different {key}s; pass --{key}")
    return json.loads(values.pop()) if values else None


@dataclass
class Plan:
    """What ``run_frontier`` trains: one (method, coefficient, config) per point, all checked."""
    measure: Measure
    parent: list[str]
    jobs: list[tuple[str, float, object]]
    base: object  # the recipes' BaseSection (given points are re-measured on it when needed)
    recipes: dict  # method -> its recipe's config as loaded (None when that method has no points)
    reward: object = None  # PPO's reward, resolved


def make_plan(out: Path, betas, kl_coefs, parent, reward, dpo_recipe: str, ppo_recipe: str,
              overrides: list[str], dpo_overrides: list[str], ppo_overrides: list[str], prompts, scorer,
              max_new_tokens, progress: bool, overwrite: bool) -> Plan:
    """Every point's stage config, validated, before anything trains."""
    for name, values in (("betas", betas), ("kl_coefs", kl_coefs)):
        if any(not isinstance(v, (int, float)) or v < 0 for v in values):
            raise ConfigError(f"frontier: {name} must be numbers >= 0, got {list(values)}")
    common = [*overrides, f"train.progress={str(progress).lower()}"]
    ppo_defaults = ["ppo.eval_every=0", "ppo.keep_best=false", "ppo.patience=0"]  # no selection on the scoring prompts
    first = {"dpo": stage_config("dpo", dpo_recipe, [*common, *dpo_overrides]) if betas or not kl_coefs else None,
             "ppo": stage_config("ppo", ppo_recipe, [*ppo_defaults, *common, *ppo_overrides]) if kl_coefs else None}
    made = [c for c in first.values() if c is not None]
    parent = recipe_value(made, "parent", parent)
    reward = recipe_value([first["ppo"]] if first["ppo"] else [], "reward", reward)
    if not parent:
        raise ConfigError("frontier: no parent adapter (pass --parent DIR; the frontier is measured against it)")
    if first["ppo"] is not None and reward is None:
        raise ConfigError("frontier: PPO needs a reward (--reward: a reward adapter or module:function)")
    measure = resolve_measure(first["dpo"], first["ppo"], prompts, scorer, max_new_tokens)
    parent = [same_path(p) for p in parent]
    jobs = []
    for method, coefs, recipe, extra in (("dpo", betas, dpo_recipe, dpo_overrides),
                                         ("ppo", kl_coefs, ppo_recipe, ppo_overrides)):
        for coef in coefs:
            name = f"{method}-{COEFFICIENTS[method]}{coef:g}"
            pins = [f"{method}.parent={json.dumps(list(parent))}", f"{method}.{COEFFICIENTS[method]}={coef}",
                    *getattr(measure, method)(), f"output.dir={json.dumps(str(out / name))}",
                    f"output.name=frontier-{name}", f"output.overwrite={str(overwrite).lower()}"]
            if method == "ppo":
                pins += [f"ppo.reward={json.dumps(rewards.describe(reward))}", "ppo.adaptive_kl=false"]
            base = ppo_defaults if method == "ppo" else []
            jobs.append((method, float(coef), stage_config(method, recipe, [*base, *common, *extra, *pins])))
    from adapterkit.preflight import preflight
    for _, _, config in jobs:
        preflight(config)  # output folders, data rows, parent and reward: before the first point trains
    return Plan(measure, list(parent), jobs, made[0].base, first, reward)


# -- points ------------------------------------------------------------------------------------

def point_from_metrics(method: str, coef: float, metrics: dict, adapter: str, trained: bool,
                       seconds: tuple[float, float] = (None, None)) -> Point:
    if "score" not in metrics or "kl" not in metrics:
        raise ConfigError(f"{adapter}: its manifest has no held-out score and kl (it was trained "
                          "without held-out prompts or a scorer)")
    return Point(method, coef, metrics["score"], metrics["kl"], metrics["parent_score"], str(adapter),
                 trained, *seconds, best_step=metrics.get("best_step"))


# What a given point must share with the frontier's recipe to sit on its curve (besides the
# parent, the reward and the coefficient itself).
SAME = {"dpo": ("mode", "loss_type", "label_smoothing", "sft_weight"),
        "ppo": ("kl_estimator", "whiten_rewards", "temperature", "ppo_epochs", "rollout_batch_size")}


def check_same_recipe(ref, method: str, recipe: dict, folder: Path, plan: Plan) -> None:
    """Refuse a given point trained another way than the frontier trains its method."""
    from adapterkit.artifact import recorded_path
    ours = plan.recipes.get(method)
    if ours is None:
        return
    ours = ours.model_dump(mode="json")[method]
    keys = [f"{method}.{k}={recipe[method].get(k)} (the frontier's: {ours.get(k)})" for k in SAME[method]
            if recipe[method].get(k) != ours.get(k)]
    if method == "ppo" and same_path(recorded_path(folder, str(recipe["ppo"].get("reward")))) != \
            same_path(rewards.describe(plan.reward)):
        keys.append(f"ppo.reward={recipe['ppo'].get('reward')} (the frontier's: {rewards.describe(plan.reward)})")
    if keys:
        raise ConfigError(f"{ref}: trained with {', '.join(keys)}; not a point of this frontier's curve")


def given_point(ref, plan: Plan) -> Point:
    """A DPO or PPO adapter trained elsewhere (e.g. by the pipeline) on the same parent and
    recipe: its coefficient and metrics from its manifest, re-measured when it was scored
    another way."""
    from adapterkit.adapters import checked_adapter
    from adapterkit.artifact import sha256_file
    folder, manifest = checked_adapter(ref, tuple(COEFFICIENTS), "frontier point")
    method, recipe = manifest["stage"], manifest["recipe"]
    want = [sha256_file(checked_adapter(p, ("sft", "dpo", "ppo", "merge"), "parent")[0]
                        / "adapter_model.safetensors") for p in plan.parent]
    measure, parent = plan.measure, plan.parent
    if [p.get("sha256") for p in manifest.get("parent", [])] != want:
        raise ConfigError(f"{ref}: trained on another parent than the frontier's ({', '.join(parent)})")
    check_same_recipe(ref, method, recipe, folder, plan)
    coef = float(recipe[method][COEFFICIENTS[method]])
    metrics = manifest.get("metrics", {})
    if measure.recorded(method, recipe, folder) != measure or "parent_score" not in metrics:
        metrics = {**metrics, **remeasure(folder, parent, measure, plan.base)}
    return point_from_metrics(method, coef, metrics, str(folder), trained=False)


def remeasure(folder: Path, parent: list[str], measure: Measure, base) -> dict:
    """``compare_to_parent`` on an adapter (above its parent stack) with the frontier's measure."""
    from adapterkit.adapters import load_adapters, load_parent_stack
    from adapterkit.base import fingerprint, load_base
    from adapterkit.data import load_data
    model, tokenizer = load_base(base)
    model, parents, _ = load_parent_stack(model, parent, fingerprint(model, tokenizer))
    model, _ = load_adapters(model, [folder], ["point"])
    prompts = [r["prompt"] for r in load_data(measure.prompts, fmt="auto", allowed=(
        "prompt", "preference", "prompt_completion")).rows]
    from adapterkit.evaluate import compare_to_parent
    metrics, _ = compare_to_parent(model, tokenizer, prompts, [*parents, "point"], parents, measure.scorer,
                                   measure.max_new_tokens)
    return metrics


def earlier_point(method: str, coef: float, config) -> Point | None:
    """The point a run of this frontier trained before into the same folder, when its inputs
    (data, base, resolved config, parent and reward weights: ``inputs.stage_inputs``) are this
    point's; None: train it."""
    from adapterkit.artifact import read_manifest
    from adapterkit.inputs import holds, stage_inputs
    folder = Path(config.output.dir)
    if not holds(folder, stage_inputs(config)["sha256"]):
        return None
    return point_from_metrics(method, coef, read_manifest(folder).get("metrics", {}), str(folder), trained=False)


def train_point(method: str, coef: float, config) -> Point:
    from adapterkit.stages import train_stage
    start, cpu = time.perf_counter(), time.process_time()
    record = train_stage(method, config)
    return point_from_metrics(method, coef, record.metrics, str(record.path), True,
                              (round(time.perf_counter() - start, 1), round(time.process_time() - cpu, 1)))


# -- output -------------------------------------------------------------------------------------

def check_out(out: Path, overwrite: bool) -> None:
    """``out`` is new, empty, a frontier's own folder (a re-run), or ``overwrite`` is set."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file() and not overwrite:
        raise OutputError(f"--out {out}: already holds files that are not a frontier's; refusing to "
                          "write there. Choose another folder, or pass --overwrite")


def write_result(out: Path, measure: Measure, parent: list[str], points: list[Point], done: bool) -> dict:
    """``frontier.json`` (after every point, so a stopped run leaves what it measured) and,
    when done, ``frontier.png``."""
    parent_score = points[0].parent_score if points else None
    result = {"kind": "adapterkit-frontier", "complete": done, "parent": parent,
              "measure": asdict(measure), "parent_score": parent_score,
              "points": [{**asdict(p), "coef_name": p.coef_name} for p in points]}
    if done:
        result["plot"] = str(plot(out / "frontier.png", points, parent_score, measure))
    tmp = out / f".{MARK}.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / MARK)
    return result


def plot(path: Path, points: list[Point], parent_score: float | None, measure: Measure) -> Path | None:
    """One line per method through its points in order of coefficient (strongest pull to the
    parent first), each point labelled with its coefficient; the parent at KL 0."""
    from adapterkit.plots import plot_curves
    lines, notes = {}, {}
    if parent_score is not None:
        lines["parent"], notes["parent"] = [(0.0, parent_score)], ["parent"]
    for method, label in LABELS.items():
        mine = sorted((p for p in points if p.method == method), key=lambda p: -p.coef)
        if mine:
            lines[label] = [(p.kl, p.score) for p in mine]
            notes[label] = [f"{p.coef:g}" for p in mine]
    return plot_curves(path, {"held-out score against KL to the parent": lines},
                       f"reward against KL (scored by {measure.scorer}, greedy, {measure.max_new_tokens} tokens)",
                       xlabel="KL(policy || parent), mean per token, held-out", notes=notes)


def run_frontier(out: str | os.PathLike, *, betas=DEFAULT_BETAS, kl_coefs=DEFAULT_KL_COEFS,
                 parent: list[str] | None = None, reward=None, dpo_recipe: str = "tiny_dpo",
                 ppo_recipe: str = "tiny_ppo", overrides: list[str] = (), dpo_overrides: list[str] = (),
                 ppo_overrides: list[str] = (), prompts: str | None = None, scorer=None,
                 max_new_tokens: int | None = None, points: list = (), progress: bool = True,
                 overwrite: bool = False, on_point: Callable[[str, float], None] | None = None) -> dict:
    """Train DPO at each of ``betas`` and PPO at each of ``kl_coefs`` on ``parent`` (default:
    the recipes' parent; PPO's reward likewise), each adapter in ``out/<method>-<coef>``, and
    write ``out/frontier.json`` and ``out/frontier.png``. ``points``: DPO/PPO adapters trained
    already on the same parent (dirs or registry refs), taken instead of training their
    coefficient again. ``overrides`` apply to both recipes (``base.name=...``), the others to
    one. Returns the JSON document."""
    out = Path(out).resolve()
    check_out(out, overwrite)
    betas, kl_coefs = list(betas), list(kl_coefs)
    first = make_plan(out, betas, kl_coefs, parent, reward, dpo_recipe, ppo_recipe, list(overrides),
                      list(dpo_overrides), list(ppo_overrides), prompts, scorer, max_new_tokens, progress, overwrite)
    given = [given_point(ref, first) for ref in points]
    if not given and not first.jobs:
        raise ConfigError("frontier: no points: give --betas and/or --kl-coefs")
    todo = [j for j in first.jobs if (j[0], j[1]) not in {(p.method, p.coef) for p in given}]
    out.mkdir(parents=True, exist_ok=True)
    done = list(given)
    write_result(out, first.measure, first.parent, done, False)
    for method, coef, config in todo:
        if on_point:
            on_point(method, coef)
        done.append(earlier_point(method, coef, config) or train_point(method, coef, config))
        write_result(out, first.measure, first.parent, done, False)
    return write_result(out, first.measure, first.parent, done, True)
