"""Reward-model accuracy, adapterkit vs trl + peft, one difference at a time.

    python benchmarks/reward_gap.py --task reverse --seeds 0 1 2 --variants ak_nf4 ak_none trl_none \
        ak_nf4_no_kbit_prep ak_nf4_stock_bnb ak_nf4:train.learning_rate=1e-3 --out ...

Runs on the bases ``quality_vs_trl.py`` built under ``--root``. A variant is a side and a
setting, with optional adapterkit overrides after a colon (``ak_nf4:train.num_epochs=1``):

- ``ak_nf4`` / ``ak_none``: ``train_reward`` with the tiny recipe, NF4 or unquantized;
- ``ak_nf4_no_kbit_prep``: without ``prepare_model_for_kbit_training``;
- ``ak_nf4_stock_bnb``: without adapterkit's CPU 4-bit patches (``keep_compute_dtype``,
  ``reuse_dequant_buffer``);
- ``trl_none`` / ``trl_nf4``: ``trl.RewardTrainer`` + peft as in ``quality_vs_trl.py``
  (overrides after the colon map to the same hyper-parameters);
- ``_from_sft`` in the name: the reward's LoRA starts from the task's adapterkit SFT adapter
  (``ak_sft``, trained by ``quality_vs_trl.py``) instead of zero, as InstructGPT's reward model
  starts from the SFT model (the head still starts random);
- a ``_amp`` suffix (``ak_none_amp``, ``trl_none_amp``): a bf16 base under bf16 autocast, as a
  GPU run computes (``bf16=True``), here on the CPU's AVX512-BF16.

Each result: held-out pairwise accuracy by the neutral evaluator (and adapterkit's own).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(task_name: str, seed: int, root: str, variant: str, tag: str = "") -> dict:
    import torch
    torch.set_num_threads(1)
    import quality_vs_trl as q
    import tasks
    task = tasks.TASKS[task_name]
    home = Path(root) / task_name / f"seed{seed}"
    task.build(home, seed)
    name, _, extra = variant.partition(":")
    extra = [e for e in extra.split(",") if e]
    out = Path(root) / f"gap{tag}" / task_name / f"seed{seed}" / variant.replace("/", "_")
    quant = "none" if "none" in name else "nf4"
    if name.startswith("trl"):
        keys = {"train.learning_rate": ("lr", float), "train.num_epochs": ("epochs", float),
                "train.batch_size": ("batch", int), "lora.r": ("r", int), "lora.lora_alpha": ("alpha", float)}
        peer = {keys[k][0]: keys[k][1](v) for k, v in (e.split("=", 1) for e in extra)}
        metrics = q.trl_reward(home, task, out, quant, amp=name.endswith("_amp"), **peer)
    else:
        import contextlib
        from unittest import mock
        patches = contextlib.ExitStack()
        if name == "ak_nf4_no_kbit_prep":
            patches.enter_context(mock.patch("peft.prepare_model_for_kbit_training", lambda m, **kw: m))
        if name == "ak_nf4_stock_bnb":
            patches.enter_context(mock.patch("adapterkit.quant.keep_compute_dtype", lambda m: 0))
            patches.enter_context(mock.patch("adapterkit.quant.reuse_dequant_buffer", lambda m: 0))
        if "_from_sft" in name:  # the reward LoRA starts as the SFT adapter (InstructGPT's RM init)
            import adapterkit.stages.reward as reward_stage
            build = reward_stage.build_model

            def build_from_sft(config):
                from peft import get_peft_model_state_dict, set_peft_model_state_dict
                from safetensors.torch import load_file
                model = build(config)
                state = get_peft_model_state_dict(model)  # LoRA + the head, as saved
                sft = load_file(str(home / "ak_sft" / "adapter_model.safetensors"))
                assert set(sft) == {k for k in state if ".lora_" in k}, "the SFT adapter does not fit"
                set_peft_model_state_dict(model, {**state, **sft})
                return model
            patches.enter_context(mock.patch.object(reward_stage, "build_model", build_from_sft))
        if name.endswith("_amp"):  # a GPU's bf16 autocast, on this CPU (AVX512-BF16)
            import adapterkit.stages.reward as reward_stage
            kwargs = reward_stage.trainer_kwargs
            patches.enter_context(mock.patch.object(reward_stage, "trainer_kwargs",
                                                    lambda c, d: {**kwargs(c, d), "bf16": True}))
            extra = ["base.compute_dtype=bfloat16", *extra]
        with patches:
            metrics = q.ak_run("reward", home, task, out, [f"base.quantization={quant}", *extra])
    pairs = q.rows(home / "data/preferences_eval.jsonl")
    neutral = q.pair_accuracy(str(home / "base"), quant, str(out), pairs)
    return {"seed": seed, "variant": variant, "accuracy": neutral["accuracy"],
            "own_accuracy": metrics.get("eval_accuracy"), "train_loss": metrics.get("train_loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="reverse")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--root", default="/tmp/adapterkit-quality")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--tag", default="", help="adapters go to ROOT/gap<TAG>/... (runs of other code)")
    ap.add_argument("--out")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [(args.task, s, args.root, v, args.tag) for v in args.variants for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    summary = {}
    for v in args.variants:
        acc = [r["accuracy"] for r in results if r["variant"] == v]
        summary[v] = {"min": min(acc), "median": statistics.median(acc), "max": max(acc),
                      "mean": statistics.mean(acc), "per_seed": acc}
        print(f"{v:60s} mean {statistics.mean(acc):.3f}  {[round(a, 3) for a in acc]}")
    if args.out:
        import adapterkit
        Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "task": args.task,
                                              "adapterkit": str(Path(adapterkit.__file__).parent),
                                              "summary": summary, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
