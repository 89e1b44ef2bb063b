"""Mixed-batch serving vs switching adapters one request at a time, on one 4-bit base.

    python benchmarks/mixed_batch.py [--requests 64] [--batch 8] [--new-tokens 16] [--threads 1]
    python benchmarks/mixed_batch.py --registry adapters --profiles legal,support,flip

Both paths answer the same requests, greedy, with the same profiles:

- mixed: batches of ``--batch`` rows, each row on its own profile (peft ``adapter_names=``;
  a stacked profile is served by its exact ``cat`` merge);
- switching: one request at a time, switching the active adapters to its profile first.

Prints requests/s for each and the ratio. Without ``--registry`` it builds the embedded tiny
base and four random LoRA adapters (r=8, every linear layer) in a temp registry, with
profiles for three single adapters and one stack of two.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapterkit.artifact import write_artifact  # noqa: E402
from adapterkit.profiles import set_profile  # noqa: E402
from adapterkit.serve import Server  # noqa: E402
from adapterkit.registry import Registry  # noqa: E402


def random_adapters(root: Path, n: int = 4) -> tuple[Registry, list[str]]:
    """A temp registry with ``n`` random LoRAs on the tiny base and profiles p0..p3."""
    from peft import LoraConfig, get_peft_model
    from adapterkit import quant
    from adapterkit.base import fingerprint, load_base
    from adapterkit.sections import BaseSection
    from adapterkit.data import template_hash
    section = BaseSection(name="tiny", compute_dtype="float32")  # as the manifests below say
    reg = Registry.open(root / "adapters")
    for i in range(n):
        model, tok = load_base(section)
        quant.keep_compute_dtype(model)
        manifest = {"name": f"a{i}", "version": None, "stage": "sft", "domain": "bench", "tags": [],
                    "base": {"source": "tiny", "fingerprint": fingerprint(model, tok), "quantization": "nf4",
                             "compute_dtype": "float32"},
                    "chat_template_sha256": template_hash(tok), "parent": [],
                    "recipe": {"base": section.model_dump(mode="json")}}
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        path = write_artifact(root / f"a{i}", lambda tmp: peft_model.save_pretrained(tmp), manifest)
        reg.publish(path, name=f"a{i}")
    profiles = {"p0": ["a0"], "p1": ["a1"], "p2": ["a2"], "p3": ["a0", "a3"]}
    for name, stack in profiles.items():
        set_profile(reg, name, stack)
    return reg, list(profiles)


def requests(n: int, profiles: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words = ["hot", "up", "big", "fast", "light", "open", "new", "high", "wet", "early", "loud", "hard"]
    prompts = ["flip: " + " ".join(rng.sample(words, rng.randint(1, 3))) for _ in range(n)]
    return prompts, [rng.choice(profiles) for _ in range(n)]


def timed(fn) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", help="an existing registry (default: a temp one with random adapters)")
    ap.add_argument("--profiles", help="comma-separated profiles from --registry")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings for each path")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.registry:
        reg, profiles = Registry.open(args.registry), args.profiles.split(",")
    else:
        work = tempfile.TemporaryDirectory(prefix="adapterkit-bench-")  # removed at exit
        reg, profiles = random_adapters(Path(work.name))
    server = Server(reg)
    prompts, keys = requests(args.requests, profiles)
    server.generate(prompts[:args.batch], keys[:args.batch], args.new_tokens, args.batch)  # load + warm up
    for k in profiles:
        server.adapter_for_row(k)  # build the cat merges before timing

    def mixed():
        return server.generate(prompts, keys, args.new_tokens, args.batch)

    def switching():
        return [server.generate([p], [k], args.new_tokens)[0] for p, k in zip(prompts, keys)]

    t_mixed, out_mixed = min((timed(mixed) for _ in range(args.repeats)), key=lambda r: r[0])
    t_switch, out_switch = min((timed(switching) for _ in range(args.repeats)), key=lambda r: r[0])
    same = sum(a == b for a, b in zip(out_mixed, out_switch))
    device = next(server.loaded.model.parameters()).device
    print(f"{args.requests} requests over {len(profiles)} profiles, {args.new_tokens} new tokens, "
          f"{device}, {torch.get_num_threads()} threads")
    print(f"  mixed batch {args.batch}:          {args.requests / t_mixed:8.1f} req/s ({t_mixed:.2f} s)")
    print(f"  switching, one at a time: {args.requests / t_switch:8.1f} req/s ({t_switch:.2f} s)")
    print(f"  ratio mixed/switching: {t_switch / t_mixed:.2f}x   (same answers: {same}/{args.requests})")


if __name__ == "__main__":
    main()
