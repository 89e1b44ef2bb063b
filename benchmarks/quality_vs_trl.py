"""Quality against the peer: adapterkit vs plain trl + peft, same base, data and budget.

    python benchmarks/quality_vs_trl.py --task tiny --seeds 0 1 2 3 4 --peer-none --out tiny.json
    python benchmarks/quality_vs_trl.py --task double --seeds 0 1 2 3 4 --peer-none --out double.json
    python benchmarks/quality_vs_trl.py --merge tiny.json double.json --out all.json

Run it from the project root: the tasks' scorers are named ``benchmarks.tasks:<function>``.

Per-stage results are kept in ``--root``/<task>/seed<N>/results.json: a rerun continues there.
``--ppo-override KEY=VALUE`` (repeatable) screens another PPO recipe on the same SFT and reward
adapters: its runs are kept apart (key and folder named after the overrides) and the report records them.

For each seed a base is built for the task (``benchmarks/tasks.py``; a tiny seed stands in for
another CPU's float rounding), then on it, with the hyper-parameters of the shipped tiny
recipes (lr, epochs, batch, LoRA r/alpha, max_length) on both sides:

- SFT: adapterkit ``train_sft`` (NF4) vs ``trl.SFTTrainer`` + ``peft.LoraConfig`` with
  ``assistant_only_loss`` (NF4, and no quantization): held-out greedy score by the task's
  ground-truth scorer, both adapters scored by one neutral evaluator (``gen_score``);
- reward: adapterkit ``train_reward`` vs ``trl.RewardTrainer`` + peft (SEQ_CLS, ``score`` in
  ``modules_to_save``, as trl's docs do it), each in NF4 and without quantization: held-out
  pairwise accuracy by one neutral evaluator (``pair_accuracy``: a vanilla
  ``AutoModelForSequenceClassification`` + ``PeftModel.from_pretrained``), and adapterkit's own;
- DPO on the SFT adapter: adapterkit ``train_dpo`` with the recipe (its RPO term) and with
  ``dpo.sft_weight=0`` (like for like) vs ``trl.DPOTrainer`` + peft, plain sigmoid, on the
  peer's own SFT adapter merged into the base (the reference is the SFT model);
- PPO: adapterkit ``train_ppo`` on its SFT with its NF4 reward model, and with the task's
  ground-truth scorer as the reward (the upper bound a reward model approaches; trl has no PPO here).

Seeds run in parallel (``--jobs``), one thread each. Not a test: it prints and writes one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import LORA, task_overrides  # noqa: E402

STAGES = ("sft", "reward", "dpo", "ppo")


# -- the recipes both sides share ----------------------------------------------------------------

def recipe(stage: str) -> dict:
    """lr, epochs, batch, max_length of a shipped tiny recipe: what the peer gets too."""
    from adapterkit.config import load_config
    c = load_config(stage, f"tiny_{stage}", [])
    return dict(lr=c.train.learning_rate, epochs=c.train.num_epochs, batch=c.train.batch_size,
                max_length=c.data.max_length, r=c.lora.r, alpha=c.lora.lora_alpha)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


# -- neutral evaluators (the same code scores both sides' adapters) -------------------------------

def load_base(base: str, quant: str, num_labels: int | None = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig
    q = None if quant == "none" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    auto, extra = (AutoModelForCausalLM, {}) if num_labels is None else (
        AutoModelForSequenceClassification, {"num_labels": num_labels})
    return auto.from_pretrained(base, quantization_config=q, dtype=torch.float32, device_map={"": "cpu"}, **extra)


def gen_score(base: str, quant: str, adapters: list[str], prompts: list, scorer) -> float:
    """Mean ground-truth score of greedy answers (16 new tokens) from base + adapters (all on)."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    from adapterkit.evaluate import mean_score
    tok = AutoTokenizer.from_pretrained(base)
    model = load_base(base, quant)
    if adapters:
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
        for i, a in enumerate(adapters[1:], 1):
            model.load_adapter(a, adapter_name=f"a{i}")
        model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    model.eval()
    return mean_score(model, tok, prompts, scorer, max_new_tokens=16)[0]


def pair_accuracy(base: str, quant: str, adapter: str, pairs: list[dict]) -> dict:
    """Held-out pairwise accuracy of a saved reward adapter, loaded the vanilla way."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    model = load_base(base, quant, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, adapter).eval()

    def scores(key):
        texts = [tok.apply_chat_template(p["prompt"] + p[key], tokenize=False) for p in pairs]
        out = []
        for i in range(0, len(texts), 32):
            batch = tok(texts[i:i + 32], padding=True, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out += model(**batch).logits[:, 0].float().tolist()
        return out
    chosen, rejected = scores("chosen"), scores("rejected")
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": statistics.mean(margins)}


# -- adapterkit ------------------------------------------------------------------------------------

def ak_run(stage: str, home: Path, task, out: Path, extra: list[str]) -> dict:
    from adapterkit.config import load_config
    from adapterkit.stages import train_stage
    per_stage = task_overrides(home, stage, home / "ak_sft", home / "ak_reward_nf4") + (
        [f"{stage}.scorer={task.SCORER}"] if stage in ("dpo", "ppo") else [])
    config = load_config(stage, f"tiny_{stage}", [f"base.name={home / 'base'}", "train.progress=false",
                                                   f"output.dir={out}", "output.overwrite=true", *per_stage,
                                                   *task.OVERRIDES.get(stage, []), *extra])
    start = time.perf_counter()
    metrics = train_stage(stage, config).metrics
    return {**metrics, "seconds": round(time.perf_counter() - start, 1)}


# -- the peer: plain trl + peft ------------------------------------------------------------------

def peer_common(out: Path, r: dict, seed: int = 0) -> dict:
    return dict(output_dir=str(out / "trainer"), per_device_train_batch_size=r["batch"], learning_rate=r["lr"],
                num_train_epochs=r["epochs"], logging_steps=10, report_to="none", save_strategy="no",
                use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=seed)


def quant_config(quant: str, compute=None):
    import torch
    from transformers import BitsAndBytesConfig
    return None if quant == "none" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute or torch.float32)


def lora(task_type: str, r: dict, **kw):
    from peft import LoraConfig
    return LoraConfig(task_type=task_type, r=r["r"], lora_alpha=r["alpha"], lora_dropout=0.0,
                      target_modules="all-linear", **kw)


def trl_sft(home: Path, task, out: Path, quant: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    r = {**recipe("sft"), **task.PEER.get("sft", {})}
    args = SFTConfig(**peer_common(out, r), max_length=r["max_length"], assistant_only_loss=True,
                     model_init_kwargs={"dtype": torch.float32, "device_map": {"": "cpu"}})
    start = time.perf_counter()
    trainer = SFTTrainer(model=str(home / "base"), args=args, train_dataset=Dataset.from_list(rows(home / "data/sft.jsonl")),
                         processing_class=AutoTokenizer.from_pretrained(home / "base"),
                         peft_config=lora("CAUSAL_LM", r), quantization_config=quant_config(quant))
    result = trainer.train()
    trainer.save_model(str(out))
    return {"train_loss": result.training_loss, "steps": result.global_step,
            "seconds": round(time.perf_counter() - start, 1)}


def trl_reward(home: Path, task, out: Path, quant: str, amp: bool = False, **overrides) -> dict:
    """``amp``: a bf16 base under bf16 autocast (what a GPU run with ``bf16=True`` does)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    r = {**recipe("reward"), **task.PEER.get("reward", {}), **overrides}
    # trl casts the trainable weights of a quantized model, the score head too, to bf16 (QLoRA);
    # with fp32 compute the bf16 head then fails on fp32 hidden states, so the peer's 4-bit
    # run is trl's QLoRA recipe as documented: bf16 compute (this CPU has AVX512-BF16)
    dtype = torch.float32 if quant == "none" and not amp else torch.bfloat16
    args = RewardConfig(**{**peer_common(out, r), "bf16": amp}, max_length=r["max_length"],
                        model_init_kwargs={"dtype": dtype, "device_map": {"": "cpu"}})
    start = time.perf_counter()
    trainer = RewardTrainer(model=str(home / "base"), args=args,
                            train_dataset=Dataset.from_list(rows(home / "data/preferences.jsonl")),
                            processing_class=AutoTokenizer.from_pretrained(home / "base"),
                            peft_config=lora("SEQ_CLS", r, modules_to_save=["score"]),
                            quantization_config=quant_config(quant, dtype))
    result = trainer.train()
    trainer.save_model(str(out))
    return {"train_loss": result.training_loss, "steps": result.global_step,
            "seconds": round(time.perf_counter() - start, 1)}


def merge_into_base(home: Path, adapter: Path, out: Path) -> Path:
    """The peer's SFT adapter merged into the full-precision base: the model its DPO starts from."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    model = PeftModel.from_pretrained(load_base(str(home / "base"), "none"), str(adapter)).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(home / "base").save_pretrained(out)
    return out


def trl_dpo(home: Path, task, out: Path, base: Path, quant: str = "nf4") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    r = {**recipe("dpo"), **task.PEER.get("dpo", {})}
    args = DPOConfig(**peer_common(out, r), max_length=r["max_length"], beta=0.1, loss_type=["sigmoid"],
                     model_init_kwargs={"dtype": torch.float32, "device_map": {"": "cpu"}})
    start = time.perf_counter()
    trainer = DPOTrainer(model=str(base), args=args,
                         train_dataset=Dataset.from_list(rows(home / "data/preferences.jsonl")),
                         processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=lora("CAUSAL_LM", r), quantization_config=quant_config(quant))
    result = trainer.train()
    trainer.save_model(str(out))
    return {"train_loss": result.training_loss, "steps": result.global_step,
            "seconds": round(time.perf_counter() - start, 1)}


# -- one seed ----------------------------------------------------------------------------------------

def ppo_tag(overrides: tuple) -> str:
    """The suffix that keeps a screened PPO recipe's runs apart: '' for the shipped recipe."""
    return "" if not overrides else "@" + ",".join(overrides).replace("/", "_")


def run_seed(task_name: str, seed: int, root: str, stages: tuple, variants: tuple,
             ppo_overrides: tuple = (), ppo_rewards: tuple = ("model", "truth")) -> dict:
    import torch
    torch.set_num_threads(1)
    import tasks
    task = tasks.TASKS[task_name]
    home = Path(root) / task_name / f"seed{seed}"
    task.build(home, seed)
    base = str(home / "base")
    scorer = task.SCORER
    prompts = [r["prompt"] for r in rows(home / "data/prompts_eval.jsonl")]
    pairs = rows(home / "data/preferences_eval.jsonl")
    res: dict = {"seed": seed}
    log = lambda *a: print(f"[{task_name} seed {seed} {time.strftime('%H:%M:%S')}]", *a, flush=True)  # noqa: E731

    def once(key, fn):
        """Memoised in home/results.json, so a rerun continues where a stopped one ended."""
        cache = home / "results.json"
        done = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in done:
            done[key] = fn()
            cache.write_text(json.dumps(done, indent=1, default=str))
            log(key, {k: v for k, v in done[key].items() if k in ("score", "accuracy", "eval_accuracy",
                                                                 "parent_score", "seconds")})
        return done[key]

    if "sft" in stages:
        res["sft_ak"] = once("sft_ak", lambda: {**ak_run("sft", home, task, home / "ak_sft", []),
                                                "score": None})
        res["sft_ak"]["score"] = once("sft_ak_score", lambda: {"score": gen_score(
            base, "nf4", [str(home / "ak_sft")], prompts, scorer)})["score"]
        for q in ("nf4", "none") if "peer_none" in variants else ("nf4",):
            res[f"sft_trl_{q}"] = once(f"sft_trl_{q}", lambda: trl_sft(home, task, home / f"trl_sft_{q}", q))
            res[f"sft_trl_{q}"]["score"] = once(f"sft_trl_{q}_score", lambda: {"score": gen_score(
                base, q, [str(home / f"trl_sft_{q}")], prompts, scorer)})["score"]
    if "reward" in stages:
        for q in ("nf4", "none"):
            res[f"reward_ak_{q}"] = once(f"reward_ak_{q}", lambda: ak_run(
                "reward", home, task, home / f"ak_reward_{q}", [f"base.quantization={q}"]))
            res[f"reward_ak_{q}"]["accuracy"] = once(f"reward_ak_{q}_neutral", lambda: pair_accuracy(
                base, q, str(home / f"ak_reward_{q}"), pairs))["accuracy"]
            res[f"reward_trl_{q}"] = once(f"reward_trl_{q}", lambda: trl_reward(home, task, home / f"trl_reward_{q}", q))
            res[f"reward_trl_{q}"]["accuracy"] = once(f"reward_trl_{q}_neutral", lambda: pair_accuracy(
                base, q, str(home / f"trl_reward_{q}"), pairs))["accuracy"]
    if "dpo" in stages:
        res["dpo_ak_rpo"] = once("dpo_ak_rpo", lambda: ak_run("dpo", home, task, home / "ak_dpo_rpo", []))
        res["dpo_ak_sigmoid"] = once("dpo_ak_sigmoid", lambda: ak_run("dpo", home, task, home / "ak_dpo_sig",
                                                                      ["dpo.sft_weight=0"]))
        merged = home / "trl_sft_merged"
        if not (merged / "config.json").is_file():
            merge_into_base(home, home / "trl_sft_nf4", merged)
        res["dpo_trl"] = once("dpo_trl", lambda: trl_dpo(home, task, home / "trl_dpo", merged))
        res["dpo_trl"]["score"] = once("dpo_trl_score", lambda: {"score": gen_score(
            str(merged), "nf4", [str(home / "trl_dpo")], prompts, scorer)})["score"]
        res["dpo_trl"]["parent_score"] = once("dpo_trl_parent_score", lambda: {"score": gen_score(
            str(merged), "nf4", [], prompts, scorer)})["score"]
    if "ppo" in stages:
        tag, extra = ppo_tag(ppo_overrides), list(ppo_overrides)
        if "model" in ppo_rewards:
            res["ppo_ak"] = once("ppo_ak" + tag, lambda: ak_run("ppo", home, task, home / f"ak_ppo{tag}", extra))
        if "truth" in ppo_rewards:
            res["ppo_ak_gt"] = once("ppo_ak_gt" + tag, lambda: ak_run("ppo", home, task, home / f"ak_ppo_gt{tag}",
                                                                      [*extra, f"ppo.reward={task.SCORER}"]))
    return res


# -- report ----------------------------------------------------------------------------------------

ROWS = [  # (row, result key, metric)
    ("SFT score: adapterkit NF4", "sft_ak", "score"),
    ("SFT score: trl+peft NF4", "sft_trl_nf4", "score"),
    ("SFT score: trl+peft no quantization", "sft_trl_none", "score"),
    ("reward accuracy: adapterkit NF4", "reward_ak_nf4", "accuracy"),
    ("reward accuracy: adapterkit no quantization", "reward_ak_none", "accuracy"),
    ("reward accuracy: trl+peft NF4", "reward_trl_nf4", "accuracy"),
    ("reward accuracy: trl+peft no quantization", "reward_trl_none", "accuracy"),
    ("reward accuracy (adapterkit's own evaluator): adapterkit NF4", "reward_ak_nf4", "eval_accuracy"),
    ("reward accuracy (adapterkit's own evaluator): adapterkit none", "reward_ak_none", "eval_accuracy"),
    ("DPO score: adapterkit recipe (RPO, sft_weight=1)", "dpo_ak_rpo", "score"),
    ("DPO score: adapterkit sigmoid (sft_weight=0)", "dpo_ak_sigmoid", "score"),
    ("DPO score: trl+peft sigmoid, on its SFT", "dpo_trl", "score"),
    ("DPO's parent (SFT) score, trl: merged SFT in NF4", "dpo_trl", "parent_score"),
    ("PPO score: adapterkit", "ppo_ak", "score"),
    ("PPO's parent (SFT) score: adapterkit", "ppo_ak", "parent_score"),
    ("PPO score, the ground truth as reward: adapterkit", "ppo_ak_gt", "score"),
]


def summarise(results: list[dict]) -> dict:
    out = {}
    for name, key, metric in ROWS:
        values = [r[key][metric] for r in results if key in r and r[key].get(metric) is not None]
        if values:
            out[name] = {"min": min(values), "median": statistics.median(values), "max": max(values),
                         "per_seed": [round(v, 4) for v in values]}
    for key, name in (("ppo_ak", "PPO gain over SFT: adapterkit"),
                      ("ppo_ak_gt", "PPO gain over SFT, the ground truth as reward: adapterkit")):
        gains = [r[key]["score"] - r[key]["parent_score"] for r in results if key in r]
        if gains:
            out[name] = {"min": min(gains), "median": statistics.median(gains), "max": max(gains),
                         "per_seed": [round(g, 4) for g in gains]}
    return out


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_per_process": 1, "gpu": None,
            "torch": torch.__version__, "python": platform.python_version(),
            **{m: __import__(m).__version__ for m in ("transformers", "peft", "trl", "bitsandbytes")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--peer-none", action="store_true", help="also the peer's SFT without quantization")
    ap.add_argument("--root", default="/tmp/adapterkit-quality", help="bases, adapters, per-seed results")
    ap.add_argument("--ppo-override", action="append", default=[], metavar="KEY=VALUE",
                    help="a dotted override for both PPO runs (repeatable), e.g. ppo.temperature=1.0")
    ap.add_argument("--ppo-reward", nargs="+", default=["model", "truth"], choices=("model", "truth"),
                    help="which PPO runs: on the reward model, on the ground-truth scorer, or both")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--merge", nargs="+", metavar="REPORT", help="only combine these reports (one per task) into --out")
    args = ap.parse_args()
    if args.merge:
        reports = [json.loads(Path(f).read_text()) for f in args.merge]
        Path(args.out).write_text(json.dumps({r["task"]: r for r in reports}, indent=2) + "\n")
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    variants = ("peer_none",) if args.peer_none else ()
    n = len(args.seeds)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_seed, [args.task] * n, args.seeds, [args.root] * n, [tuple(args.stages)] * n,
                                [variants] * n, [tuple(args.ppo_override)] * n, [tuple(args.ppo_reward)] * n))
    import adapterkit
    report = {"command": "python " + " ".join(sys.argv), "task": args.task, "machine": machine(),
              "adapterkit": str(Path(adapterkit.__file__).parent), "recipes": {s: recipe(s) for s in STAGES},
              "ppo_overrides": args.ppo_override, "ppo_rewards": args.ppo_reward,
              "summary": summarise(results), "results": results}
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for name, v in report["summary"].items():
        print(f"{name:62s} {v['min']:.3f} {v['median']:.3f} {v['max']:.3f}  {v['per_seed']}")


if __name__ == "__main__":
    main()
