"""``adapterkit plan``: the predicted peak memory of a stage, before anything loads. Parsing
and printing only (the memory model is ``memory.py``); registered in ``cli.COMMANDS``."""
from __future__ import annotations

from adapterkit.cli import command, print_json

LABELS = {"base": "base weights", "adapters": "LoRA adapters + heads (fp32)",
          "optimizer": "AdamW moments (fp32)", "gradients": "gradients (fp32)",
          "cublas_workspace": "cuBLAS workspaces (forward, backward)",
          "activations": "activations kept for backward", "lm_head": "LM head backward (trl's chunked tile)",
          "score_head": "reward scores", "layer_backward": "a layer's backward (+ its recompute)",
          "logits": "logits (B x response x V) and their gradients", "kv_cache": "generation KV cache",
          "prefill": "generation prefill", "forward": "a no-grad forward",
          "dequant_buffer": "CPU 4-bit dequantization buffer"}


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _run_plan(args) -> None:
    from adapterkit.memory import MAX_BATCH, plan
    p = plan(args.recipe, args.overrides, stage=args.stage, gpu=args.gpu, device=args.device,
             batch_size=args.batch_size, seq_len=args.seq_len)
    if args.json:
        print_json(p.to_dict())
        return
    a, s, b = p.arch, p.shape, args.device
    dtype = "fp32" if b == "cpu" else "the recipe's compute dtype (auto: bf16)"
    print(f"{p.stage} on {p.base} ({a['model_type']}: {a['layers']} layers, hidden {a['hidden']}, "
          f"MLP {a['intermediate']}, heads {a['heads']}/{a['kv_heads']}, vocab {a['vocab']}), {b}, {dtype}")
    rows = f"batch {s['batch_size']} x {s['seq_len']} tokens"
    if p.stage == "ppo":
        rows = (f"rollouts {s['rollout_batch_size']} x ({s['seq_len']} prompt + {s['response_len']} new tokens), "
                f"PPO micro-batch {s['batch_size']}")
    print(f"  {rows}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    print("  adapters: " + ", ".join(f"{x['role']} r={x['r']}{' (trained)' if x['trainable'] else ''}"
                                     for x in p.adapters))
    for key, value in p.terms.items():
        print(f"  {LABELS.get(key, key):46s} {size(value):>11s}")
    print(f"  {'peak (' + p.peak_phase + ')':46s} {size(p.peak_bytes):>11s}")
    acts = p.activations
    print(f"  activations: {size(acts['checkpointed'])} with gradient checkpointing, {size(acts['full'])} without")
    if p.gpu_bytes is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        most = lambda b: f"{b}+" if b == MAX_BATCH else str(b)  # noqa: E731
        print(f"  on {args.gpu} ({size(p.usable_bytes)} usable, 1 GiB kept for CUDA itself): {verdict}; largest "
              f"train.batch_size that fits: {most(p.max_batch_size)} ({most(p.max_batch_size_checkpointed)} with "
              "gradient checkpointing)")
    for note in p.notes:
        print(f"  note: {note}")


@command("plan", "predict a stage's peak GPU memory from the recipe and the base's config.json, "
                 "before anything loads; --gpu: does it fit, and the largest batch that does", _run_plan)
def _plan_args(p):
    p.description = (p.description + ". Terms: the base in its quantization, every LoRA adapter the stage "
                     "holds, AdamW state, gradients, activations (with and without gradient checkpointing), "
                     "the LM head or logits, and PPO's generation KV cache. Only config.json is read (a local "
                     "folder, or a hub name's config alone). Checked against measured peaks on CPU "
                     "(tests/test_plan.py, benchmarks/plan_check.py).")
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped one (see `adapterkit recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.batch_size=4")
    p.add_argument("--gpu", metavar="SIZE", help="the card's memory: 24GB, 80GB, 24GiB; says whether it "
                   "fits and the largest train.batch_size that does")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default: the GPU plan, compute dtype auto = bf16) or cpu (fp32)")
    p.add_argument("--stage", choices=("sft", "reward", "dpo", "ppo"),
                   help="the stage, for a recipe without a stage: key")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: data.max_length; PPO: the prompt)")
    p.add_argument("--json", action="store_true", help="the plan as one JSON document (bytes per term)")
