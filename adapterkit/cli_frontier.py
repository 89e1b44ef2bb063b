"""``adapterkit frontier``: reward against KL. Parsing and printing only (the work is
``adapterkit.frontier.run_frontier``); registered in ``cli.COMMANDS``."""
from __future__ import annotations

import os

from adapterkit.cli import command, console, print_json
from adapterkit.errors import ConfigError

DESCRIPTION = """\
Train DPO at several dpo.beta and PPO at several ppo.kl_coef from the same parent adapter and
plot each one's held-out score against its KL to the parent, one curve per method (Rafailov
et al. 2023, Fig. 2 left). Every point is measured alike: greedy answers to the same held-out
prompts, the same scorer (a reward function), the exact per-token KL(policy || parent) on the
policy's answers; the parent is the point at KL 0. Writes OUT/<method>-<coef>/ (one adapter per
point), OUT/frontier.json and OUT/frontier.png.

On the tiny task (after `adapterkit sft tiny_sft` and `adapterkit reward tiny_reward`):
  adapterkit frontier --out runs/frontier
On your task: your recipes, parent, reward and a scorer:
  adapterkit frontier --dpo-recipe my_dpo.yaml --ppo-recipe my_ppo.yaml --parent runs/sft \\
      --reward runs/reward --scorer mymodule:score --out runs/frontier"""


def floats(text: str) -> list[float]:
    """``0.05,0.5`` -> [0.05, 0.5]; ``""`` -> [] (that method is left out)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"frontier: expected comma-separated numbers, got {text!r}") from None


TINY_INPUTS = {"parent": ("runs/tiny/sft", "adapterkit sft tiny_sft"),
               "reward": ("runs/tiny/reward", "adapterkit reward tiny_reward")}


def tiny_inputs_first(args, with_ppo: bool) -> None:
    """On the tiny recipes, whose parent and reward are paths under runs/tiny: say what to run
    first when one is missing (rather than the adapter check's generic message)."""
    if (args.dpo_recipe, args.ppo_recipe) != ("tiny_dpo", "tiny_ppo"):
        return
    needed = ["parent"] + (["reward"] if with_ppo else [])
    for key in needed:
        path, run = TINY_INPUTS[key]
        if getattr(args, key) is None and not os.path.isdir(path):
            raise ConfigError(f"frontier: no {key} adapter at {path}: run `{run}` first, or pass --{key}")


def _run_frontier(args) -> None:
    from adapterkit.frontier import run_frontier
    con = console()
    betas, kl_coefs = floats(args.betas), floats(args.kl_coefs)
    tiny_inputs_first(args, bool(kl_coefs))
    result = run_frontier(
        args.out, betas=betas, kl_coefs=kl_coefs, parent=args.parent,
        reward=args.reward, dpo_recipe=args.dpo_recipe, ppo_recipe=args.ppo_recipe,
        overrides=args.set or [], dpo_overrides=args.dpo or [], ppo_overrides=args.ppo or [],
        prompts=args.prompts, scorer=args.scorer, max_new_tokens=args.max_new_tokens,
        points=args.point or [], progress=not (args.quiet or args.json), overwrite=args.overwrite,
        on_point=None if args.json else lambda m, c: con.rule(f"frontier: {m} at {c:g}"))
    if args.json:
        print_json(result)
        return
    from rich.table import Table
    table = Table(title=f"reward against KL - scored by {result['measure']['scorer']} on "
                        f"{result['measure']['prompts']}")
    for col in ("method", "coefficient", "held-out score", "KL to parent", "seconds (CPU)"):
        table.add_column(col)
    table.add_row("parent", "-", f"{result['parent_score']:.3f}", "0", "-")
    for p in result["points"]:
        table.add_row(p["method"], f"{p['coef_name']}={p['coef']:g}", f"{p['score']:.3f}", f"{p['kl']:.4f}",
                      "reused" if not p["trained"] else f"{p['seconds']:.0f} ({p['cpu_seconds']:.0f})")
    con.print(table)
    print(f"parent: {' + '.join(map(os.path.relpath, result['parent']))}")
    for p in result["points"]:
        print(f"{p['method']} {p['coef_name']}={p['coef']:g}: {os.path.relpath(p['adapter'])}")
    print(f"plot: {os.path.relpath(result['plot'])}\njson: {os.path.relpath(os.path.join(args.out, 'frontier.json'))}")


@command("frontier", "reward against KL: DPO at several beta and PPO at several KL coefficients, "
         "held-out score against KL to the parent", _run_frontier)
def _frontier_args(p):
    import argparse
    from adapterkit.frontier import DEFAULT_BETAS, DEFAULT_KL_COEFS
    betas, kl_coefs = (",".join(f"{v:g}" for v in vs) for vs in (DEFAULT_BETAS, DEFAULT_KL_COEFS))
    p.description, p.formatter_class = DESCRIPTION, argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", required=True, help="folder for the point adapters, frontier.json and "
                   "frontier.png; refused when it holds anything else, unless --overwrite")
    p.add_argument("--betas", default=betas, help="dpo.beta values, comma-separated; '' for no "
                   f"DPO curve (default: {betas})")
    p.add_argument("--kl-coefs", default=kl_coefs, help="ppo.kl_coef values (per unit of the reward's "
                   "spread with ppo.normalize_scores, else in its units), comma-separated; '' for no PPO "
                   f"curve (default: {kl_coefs})")
    p.add_argument("--parent", nargs="+", metavar="DIR", help="the parent stack every point is trained "
                   "on and measured against (default: the recipes' dpo.parent / ppo.parent)")
    p.add_argument("--reward", help="PPO's reward: a reward adapter or module:function (default: the "
                   "PPO recipe's ppo.reward)")
    p.add_argument("--dpo-recipe", default="tiny_dpo", help="the DPO recipe (default: tiny_dpo)")
    p.add_argument("--ppo-recipe", default="tiny_ppo", help="the PPO recipe (default: tiny_ppo)")
    p.add_argument("--set", action="append", metavar="key.sub=value", help="an override for both "
                   "recipes, e.g. base.name=... (repeatable)")
    p.add_argument("--dpo", action="append", metavar="key.sub=value", help="an override for the DPO recipe")
    p.add_argument("--ppo", action="append", metavar="key.sub=value", help="an override for the PPO recipe")
    p.add_argument("--scorer", help="the reward function that scores every point's held-out answers "
                   "(module:function; default: the recipes' ppo.scorer / dpo.scorer)")
    p.add_argument("--prompts", metavar="FILE", help="held-out prompts (default: the PPO recipe's data.eval)")
    p.add_argument("--max-new-tokens", type=int, help="greedy answer length for every point (default: "
                   "the PPO recipe's ppo.max_new_tokens; PPO also trains at it)")
    p.add_argument("--point", action="append", metavar="DIR", help="a DPO or PPO adapter already "
                   "trained on the same parent: used as the point of its coefficient, not retrained")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it holds other files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print frontier.json as one JSON document")
