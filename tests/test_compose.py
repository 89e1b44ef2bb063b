"""Real adapters on the 4-bit tiny base: compatibility checks, stack, merge, export, serving.

Two adapters of different ranks and target modules: the session's SFT adapter (r=8, every
linear layer) and a small random LoRA (r=4, q/v/down only) written as a proper artifact.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapterkit.artifact import MANIFEST, read_manifest, write_artifact
from adapterkit.base import trained_base
from adapterkit.export import export_loaded
from adapterkit.lineage import lineage
from adapterkit.merge import MergeSpec, merge_loaded, save_merged
from adapterkit.profiles import set_profile
from adapterkit.serve import Server, serve_profile
from adapterkit.stack import load_profile, load_stack, prompt_logits
from adapterkit.errors import CompatibilityError, IntegrityError
from adapterkit.registry import Registry, RegistryError
from helpers import ON_CUDA, gap, tol

PROMPTS = ["flip: hot up", "flip: big wet fast", "What is 2 + 2?"]
# "exact" is exact up to fp32 rounding on CPU; on a GPU the stack computes in bf16 (auto), and
# two exact routes to the same sum round differently there: held to the mean difference (gap)
TOL = tol(cpu=1e-4, cuda=0.05)


def fresh_base(manifest):
    from adapterkit import quant
    from adapterkit.base import load_model
    model = load_model(trained_base(manifest))
    quant.keep_compute_dtype(model)
    return model.eval()


@pytest.fixture(scope="module")
def second_adapter(sft_adapter, tmp_path_factory):
    """A rank-4 LoRA on q/v/down with random (small) weights, saved as an adapterkit artifact."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(fresh_base(sft_adapter.manifest),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # (out, r): a visible but moderate change
    m = sft_adapter.manifest
    manifest = {"name": "second", "version": None, "stage": "sft", "domain": "flip", "tags": ["test"],
                "base": m["base"], "chat_template_sha256": m["chat_template_sha256"], "parent": [],
                "recipe": {"base": m["recipe"]["base"]}}
    out = tmp_path_factory.mktemp("second") / "adapter"
    return write_artifact(out, lambda tmp: model.save_pretrained(tmp), manifest)


@pytest.fixture(scope="module")
def reg(sft_adapter, second_adapter, tmp_path_factory):
    reg = Registry.open(tmp_path_factory.mktemp("registry") / "adapters")
    reg.publish(sft_adapter.path, name="tiny-sft", domain="flip")
    reg.publish(second_adapter, name="second", domain="flip")
    set_profile(reg, "flip", ["tiny-sft", "second@1"])
    set_profile(reg, "sft-only", ["tiny-sft@1"])
    set_profile(reg, "second-only", ["second"])
    return reg


@pytest.fixture(scope="module")
def loaded(reg):
    return load_stack(["tiny-sft", "second"], reg)


@pytest.fixture(scope="module")
def stacked(loaded):
    return prompt_logits(loaded.model, loaded.tokenizer, PROMPTS, loaded.names)


def logit_gap(a, b) -> float:
    """``gap`` over the prompts' logits: the largest difference on CPU, the mean on a GPU."""
    diffs = torch.cat([(x.float() - y.float()).abs().flatten() for x, y in zip(a, b)])
    return gap(diffs.max().item(), diffs.mean().item())


def test_entries_load_with_vanilla_peft(reg, sft_adapter, loaded):
    from peft import PeftModel
    assert sorted(e.ref for e in loaded.entries) == sorted(e.ref for e in reg.list())
    for entry, name in zip(loaded.entries, loaded.names):
        model = PeftModel.from_pretrained(fresh_base(entry.manifest), str(entry.path)).eval()
        ours = prompt_logits(loaded.model, loaded.tokenizer, PROMPTS[:1], [name])
        theirs = prompt_logits(model, loaded.tokenizer, PROMPTS[:1])
        assert logit_gap(ours, theirs) < tol(cpu=1e-5, cuda=TOL)


def test_stack_warns_about_different_target_modules(loaded):
    [w] = [w for w in loaded.warnings if "target different modules" in w]
    assert "second@1 lacks gate_proj, k_proj, o_proj, up_proj" in w


def test_cat_merge_is_exact_and_saves_a_vanilla_adapter(loaded, stacked, reg, tmp_path):
    from peft import PeftModel
    report = merge_loaded(loaded, MergeSpec("cat"), "cat_test", PROMPTS)
    assert report.exact and report.rank == 12 and gap(report.max_logit_diff, report.mean_logit_diff) < TOL
    path = save_merged(loaded, report, tmp_path / "merged", "flip-cat", "flip")
    manifest = read_manifest(path)
    assert manifest["merge"]["sources"][0]["ref"] == "tiny-sft@1" and manifest["stage"] == "merge"
    model = PeftModel.from_pretrained(fresh_base(manifest), str(path)).eval()
    assert logit_gap(stacked, prompt_logits(model, loaded.tokenizer, PROMPTS)) < TOL
    assert reg.publish(path, name="flip-cat").stage == "merge"  # a merge is an ordinary entry
    assert lineage(reg, "flip-cat")["merged_from"] == ["tiny-sft@1", "second@1"]
    reg.remove("flip-cat@1")


@pytest.mark.parametrize("method,mixed,note", [
    ("linear", "pad", "zero-padded to rank 8"), ("ties", "pad", "zero-padded to rank 8"),
    ("dare_linear", "pad", "zero-padded to rank 8"), ("dare_ties", "svd", "ran peft's dare_ties_svd variant"),
    ("svd", "pad", "svd"),
])
def test_approximate_methods_run_on_mixed_ranks_and_report_their_error(loaded, method, mixed, note):
    report = merge_loaded(loaded, MergeSpec(method, mixed_ranks=mixed), f"m_{method}", PROMPTS)
    assert note in report.note and not report.exact
    assert 0 < report.mean_logit_diff <= report.max_logit_diff < float("inf")
    assert report.rank == 8


def test_fp32_export_reproduces_the_stack(loaded, stacked, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    report = export_loaded(loaded, tmp_path / "export", "float32", PROMPTS)
    assert gap(report.max_logit_diff, report.mean_logit_diff) < TOL
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert not hasattr(model.config, "quantization_config")
    assert logit_gap(stacked, prompt_logits(model, tok, PROMPTS)) < TOL
    manifest = json.loads((tmp_path / "export" / MANIFEST).read_text())
    assert manifest["kind"] == "export" and "model.safetensors" in manifest["files"]
    bf16 = export_loaded(loaded, tmp_path / "export16", "bfloat16", PROMPTS)  # reports what bf16 costs
    if not ON_CUDA:  # against an fp32 stack; a bf16 (GPU) stack is no closer to the fp32 export
        assert bf16.max_logit_diff > report.max_logit_diff
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export16").dtype == torch.bfloat16


def test_mixed_batch_matches_each_profile_alone(reg):
    prompts = ["flip: hot up", "flip: big", "flip: wet fast slow", "flip: new", "flip: open high", "flip: loud"]
    keys = ["flip", "sft-only", "second-only", "second-only", "flip", "sft-only"]
    server = Server(reg)
    mixed = server.generate(prompts, keys, max_new_tokens=6)
    alone = {}
    for key in dict.fromkeys(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        for i, answer in zip(rows, server.generate([prompts[i] for i in rows], [key] * len(rows), 6)):
            alone[i] = answer
    assert mixed == [alone[i] for i in range(len(prompts))]
    assert len(set(mixed)) > 1  # the profiles do answer differently
    assert server.stacks["flip"] == ["tiny-sft_v1", "second_v1"] and "flip" in server.single
    assert serve_profile("sft-only", [prompts[1], prompts[5]], reg, max_new_tokens=6) == [alone[1], alone[5]]


# -- failures, each with the message the user sees -----------------------------------------------

def _republish(reg, entry_ref, name, edit):
    """Copy an entry's files, edit its manifest, publish it under ``name``."""
    src = reg.get(entry_ref).path
    dst = reg.root.parent / f"src-{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return reg.publish(dst, name=name)


def test_wrong_base_is_refused_unless_forced(reg):
    def other_base(m):
        m["base"]["fingerprint"]["id"] = "0123456789abcdef"
    _republish(reg, "second", "second-elsewhere", other_base)
    with pytest.raises(CompatibilityError, match=r"second-elsewhere@1 was trained on base 0123456789abcdef .*"
                                                 r"refusing to stack it.*force=True"):
        load_stack(["tiny-sft", "second-elsewhere"], reg)
    forced = load_stack(["second-elsewhere"], reg, force=True)
    assert any("(forced)" in w for w in forced.warnings)


def test_chat_template_difference_is_a_warning(reg, caplog):
    def other_template(m):
        m["chat_template_sha256"] = "f" * 64
    _republish(reg, "second", "second-template", other_template)
    loaded = load_stack(["second-template"], reg)
    assert any("chat template differs: trained with sha256 ffffffffffff" in w for w in loaded.warnings)
    assert "chat template differs" in caplog.text


def test_tampered_entry_fails_to_load_naming_the_file(reg, tmp_path):
    bad = Registry.open(tmp_path / "bad")
    bad.publish(reg.get("second").path, name="second")
    weights = bad.get("second").path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(IntegrityError, match=r"second/1/adapter_model\.safetensors: sha256 does not match"):
        load_stack(["second"], bad)


def test_profile_naming_a_missing_adapter(reg):
    with pytest.raises(RegistryError, match=r"profile 'legal' names 'legal-sft@2', which is not in the registry"):
        set_profile(reg, "legal", ["tiny-sft", "legal-sft@2"])
    with pytest.raises(RegistryError, match="unknown merge method 'average'"):
        set_profile(reg, "legal", ["tiny-sft"], mode="merge", method="average")
    with pytest.raises(RegistryError, match=r"no profile named 'legal'"):
        load_profile("legal", reg)
