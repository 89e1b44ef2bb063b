"""What the benchmark scripts share: a Llama base built from config, memory probes, and
running each side in its own process (so each peak is its own).

Not a test and not part of the package; the scripts put this folder on ``sys.path``.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")  # every side, every script
_SCRATCH: list[str] = []
# Llama-3.1's published config.json shapes, for the planner's 8B/70B figures (no weights built
# unless a CUDA benchmark asks): plan_check.py, scaling_table.py.
_LLAMA3 = dict(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=False)
LLAMA_SHAPES = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, **_LLAMA3),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, **_LLAMA3),
}


def task_overrides(home: Path, stage: str, sft: Path, reward: Path) -> list[str]:
    """A stage's data and parent overrides for a task folder in the tiny layout
    (``home/data/<split>.jsonl``), on the SFT adapter ``sft`` and the reward adapter ``reward``."""
    data = lambda split: str(Path(home) / "data" / f"{split}.jsonl")  # noqa: E731
    pairs = [f"data.train={data('preferences')}", f"data.eval={data('preferences_eval')}"]
    return {
        "sft": [f"data.train={data('sft')}", f"data.eval={data('sft_eval')}"],
        "reward": pairs,
        "dpo": [*pairs, f"dpo.prompts={data('prompts_eval')}", f"dpo.parent={json.dumps([str(sft)])}"],
        "ppo": [f"data.train={data('prompts')}", f"data.eval={data('prompts_eval')}",
                f"ppo.parent={json.dumps([str(sft)])}", f"ppo.reward={reward}"],
    }[stage]


def scratch() -> str:
    """A fresh directory, removed when this process exits (bases, adapters, trainer output)."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="adapterkit-bench-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return tempfile.mkdtemp(dir=_SCRATCH[0])


def rss_mb() -> float:
    """Current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MiB. Not ``getrusage``'s ru_maxrss:
    Linux carries that over from the parent across fork + exec, so a side started by a driver
    that had built a large base would report the driver's peak instead of its own."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def memory_report(baseline_mb: float) -> dict:
    """Peak RSS, peak RSS above the post-import baseline, and peak CUDA allocated when present."""
    import torch
    out = {"peak_rss_mb": peak_rss_mb(), "peak_rss_above_baseline_mb": peak_rss_mb() - baseline_mb,
           "baseline_rss_mb": baseline_mb}
    if torch.cuda.is_available():
        out["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_nf4(base: str, num_labels: int | None = None):
    """The base as a peer loads it: 4-bit NF4, double quantization, fp32 compute; a causal LM,
    or a sequence classifier with ``num_labels``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    auto, extra = (AutoModelForCausalLM, {}) if num_labels is None else (
        AutoModelForSequenceClassification, {"num_labels": num_labels})
    return auto.from_pretrained(base, quantization_config=nf4, dtype=torch.float32, device_map={"": device()},
                                **extra)


def step_times(stamps: list[float]) -> dict:
    """Seconds of each step from clock readings taken before the first step and after each;
    the median leaves out the first step (warm-up)."""
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds_per_step": statistics.median(times[1:] or times), "step_seconds": times}


def clock(stamps: list[float]):
    """A transformers TrainerCallback that appends the time to ``stamps`` after each step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
    return Clock()


def llama_config(vocab_size: int, hidden: int, layers: int, tokenizer):
    """A Llama of the given width and depth: MLP 8/3 x hidden, heads of 64, 4 query heads per KV head."""
    from transformers import LlamaConfig
    heads = max(1, hidden // 64)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 4), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)


def build_base(out: Path, hidden: int, layers: int, checkpoint: str = "bf16") -> dict:
    """A randomly initialised Llama with the tiny task's tokenizer and chat template (random
    weights cost the same compute as trained ones), saved as safetensors in bf16, or already
    quantized to NF4 (``checkpoint="nf4"``, as the hub's ``-bnb-4bit`` repos are): loading it
    then reads 4-bit weights instead of holding the whole bf16 file while quantizing."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from adapterkit.tiny import ensure_tiny
    tok = AutoTokenizer.from_pretrained(ensure_tiny() / "base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tok), hidden, layers, tok)).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    size = {"hidden": hidden, "layers": layers, "parameters": model.num_parameters(), "checkpoint": checkpoint}
    with tempfile.TemporaryDirectory() as bf16:  # the bf16 copy an nf4 checkpoint is made from
        full = Path(bf16) if checkpoint == "nf4" else out
        model.save_pretrained(full, safe_serialization=True)
        tok.save_pretrained(full)
        if checkpoint == "nf4":
            del model
            load_nf4(str(full)).save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
    return size


def run_side(script: str, python: str, args: list[str], preload: str | None = None) -> dict:
    """Run ``python script --side ... args`` (with ``LD_PRELOAD=preload``, an allocator, when
    given) and return the JSON its last stdout line holds."""
    env = {**os.environ, "LD_PRELOAD": preload} if preload else None
    proc = subprocess.run([python, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(args[:2])}: exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """One side's report over repeated runs: the median of every number, and the runs."""
    if len(runs) == 1:
        return runs[0]
    numbers = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {**{k: statistics.median(r[k] for r in runs) for k in numbers}, "runs": runs}


def machine() -> dict:
    import torch
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads()}


def compare(script: str, doc: str, sides: dict, keys: tuple[str, ...], **defaults) -> None:
    """The command line of a two-sided benchmark whose sides are ``side(base, steps, batch) ->
    dict``: build the base, run each side in its own process, print the ratios."""
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("hidden", "layers", "steps", "batch"):
        parser.add_argument(f"--{flag}", type=int, default=defaults[flag])
    parser.add_argument("--checkpoint", choices=["nf4", "bf16"], default="nf4",
                        help="the base as both sides read it: pre-quantized (default) or bf16")
    parser.add_argument("--out", help="also write the report to this JSON file")
    parser.add_argument("--side", choices=list(sides), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: run one side, print its JSON
        print(json.dumps(sides[args.side](args.base, args.steps, args.batch)))
        return
    base = Path(scratch()) / "base"
    report = {"model": build_base(base, args.hidden, args.layers, args.checkpoint), "steps": args.steps,
              "batch": args.batch, **machine()}
    for side in sides:
        report[side] = run_side(script, sys.executable, ["--side", side, "--base", str(base),
                                                         "--steps", str(args.steps), "--batch", str(args.batch)])
    finish(report, keys, args.out)


def finish(report: dict, keys: tuple[str, ...], out: str | None = None) -> None:
    """Add adapterkit / peer for every key both sides report; print the report (and save it)."""
    ours, peer = report["adapterkit"], report["trl"]
    report["ratios_adapterkit_over_trl"] = {k: ours[k] / peer[k] for k in keys if k in ours and k in peer}
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
