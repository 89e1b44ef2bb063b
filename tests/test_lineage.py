"""Issue #12 on fake artifacts (no model): lineage by identity, stacks that bring their
parents, pinned profiles and their updates, and the CLI's one-line refusals."""
from __future__ import annotations

import json

import pytest

from adapterkit.artifact import MANIFEST, sha256_file
from adapterkit.errors import CompatibilityError
from adapterkit.lineage import lineage, serving_stack, tree_lines
from adapterkit.profiles import get_profile, newer_versions, resolve_key, set_profile, update_profile
from adapterkit.registry import Registry, RegistryError
from test_registry import fake_adapter, run_cli


def parent_of(path, ref=None) -> dict:
    """A parent record as ``adapters.parent_record`` writes it."""
    record = {"name": json.loads((path / MANIFEST).read_text())["name"], "path": str(path),
              "sha256": sha256_file(path / "adapter_model.safetensors")}
    return {**record, "ref": ref} if ref else record


@pytest.fixture
def two_domains(tmp_path):
    """legal-sft and med-sft: the same bytes published under two names; a DPO on each."""
    reg = Registry.open(tmp_path / "adapters")
    legal = fake_adapter(tmp_path / "runs" / "legal-sft", name="legal-sft", domain="legal")
    med = fake_adapter(tmp_path / "runs" / "med-sft", name="med-sft", domain="medical")  # same payload
    reg.publish(legal, name="legal-sft")
    reg.publish(med, name="med-sft")
    dpo = fake_adapter(tmp_path / "runs" / "legal-dpo", name="legal-dpo", stage="dpo", payload=b"ldpo",
                       parent=[parent_of(legal)])
    ppo = fake_adapter(tmp_path / "runs" / "med-ppo", name="med-ppo", stage="ppo", domain="medical",
                       payload=b"mppo", parent=[parent_of(med)])
    reg.publish(dpo, name="legal-dpo")
    reg.publish(ppo, name="med-ppo")
    return reg, tmp_path


def test_same_bytes_under_two_names_keep_two_lineages(two_domains):
    reg, _ = two_domains
    assert reg.get("legal-sft").weights_sha256 == reg.get("med-sft").weights_sha256
    assert serving_stack(reg, "med-ppo") == ["med-sft@1", "med-ppo@1"]  # not legal-sft@1, found first
    assert serving_stack(reg, "legal-dpo") == ["legal-sft@1", "legal-dpo@1"]
    assert reg.get("med-ppo").parent[0]["registry_ref"] == "med-sft@1"  # stored at publish: read, not recomputed
    assert "└── med-sft@1  [sft, medical" in "\n".join(tree_lines(lineage(reg, "med-ppo")))


def test_a_recorded_ref_wins_and_an_ambiguous_parent_is_refused(two_domains):
    reg, tmp = two_domains
    sft = reg.get("legal-sft@1")
    # trained on the registry entry med-sft@1 although its manifest says legal: the ref decides
    by_ref = fake_adapter(tmp / "runs" / "x", name="x", stage="dpo", payload=b"x",
                          parent=[{**parent_of(sft.path), "ref": "med-sft@1"}])
    assert serving_stack(reg, reg.publish(by_ref, name="x").ref) == ["med-sft@1", "x@1"]
    # the same bytes, a third name and a third domain: no rule picks one, so it is refused
    lost = fake_adapter(tmp / "runs" / "y", name="y", stage="dpo", domain="other", payload=b"y",
                        parent=[{**parent_of(sft.path), "name": "renamed"}])
    with pytest.raises(RegistryError, match=r"published as legal-sft@1, med-sft@1; say which with --parent REF"):
        reg.publish(lost, name="y")
    assert serving_stack(reg, reg.publish(lost, name="y", parents=["legal-sft@1"]).ref) == ["legal-sft@1", "y@1"]
    with pytest.raises(RegistryError, match="--parent legal-dpo@1 is not the parent it was trained on"):
        reg.publish(lost, name="y", parents=["legal-dpo@1"])


def test_a_stack_brings_its_parents_or_refuses_naming_them(two_domains):
    reg, tmp = two_domains
    oops = set_profile(reg, "oops", ["legal-dpo"])
    assert oops.stack == ["legal-sft@1", "legal-dpo@1"]
    assert resolve_key(reg, "legal-dpo") == (["legal-sft@1", "legal-dpo@1"], None, [])
    refs, _, notes = resolve_key(reg, "legal-dpo", alone=True)
    assert refs == ["legal-dpo@1"] and "served alone (--alone), without legal-sft@1" in notes[0]
    assert set_profile(reg, "bare", ["legal-dpo"], alone=True).stack == ["legal-dpo@1"]
    orphan = fake_adapter(tmp / "runs" / "orphan", name="orphan", stage="dpo", payload=b"o",
                          parent=[{"name": "unpublished", "path": str(tmp / "nowhere"), "sha256": "f" * 64}])
    reg.publish(orphan, name="orphan")
    with pytest.raises(RegistryError, match=r"profile 'p': orphan@1 was trained on top of unpublished .*--alone"):
        set_profile(reg, "p", ["orphan"])


def test_profiles_pin_versions_and_update_checks_lineage(two_domains):
    reg, tmp = two_domains
    set_profile(reg, "legal", ["legal-sft@latest", "legal-dpo@latest"])
    sft2 = reg.publish(fake_adapter(tmp / "runs" / "legal-sft2", name="legal-sft", payload=b"v2"), name="legal-sft")
    profile = get_profile(reg, "legal")
    assert profile.stack == ["legal-sft@1", "legal-dpo@1"]  # publishing @2 changed nothing
    assert newer_versions(reg, profile) == {"legal-sft@1": "legal-sft@2"}
    with pytest.raises(CompatibilityError, match=r"legal-dpo@1 was trained on top of legal-sft@1, but the stack holds legal-sft@2"):
        update_profile(reg, "legal")
    with pytest.raises(CompatibilityError, match="the stack holds legal-sft@2"):
        set_profile(reg, "mixed", ["legal-sft@2", "legal-dpo@1"])
    dpo2 = fake_adapter(tmp / "runs" / "legal-dpo2", name="legal-dpo", stage="dpo", payload=b"dpo2",
                        parent=[parent_of(sft2.path, ref="legal-sft@2")])
    reg.publish(dpo2, name="legal-dpo")
    profile, moved = update_profile(reg, "legal")
    assert moved == {"legal-sft@1": "legal-sft@2", "legal-dpo@1": "legal-dpo@2"}
    assert profile.stack == ["legal-sft@2", "legal-dpo@2"] and newer_versions(reg, profile) == {}


def test_cli_profiles_and_refusals(two_domains, capsys):
    reg, tmp = two_domains
    root = str(reg.root)
    code, out, _ = run_cli(capsys, "profile", "set", "oops", "legal-dpo", "--registry", root)
    assert code == 0 and "profile oops (legal): legal-sft@1 + legal-dpo@1 [stack]" in out
    code, out, _ = run_cli(capsys, "profile", "set", "bare", "legal-dpo", "--alone", "--registry", root)
    assert code == 0 and "note: legal-dpo@1 is served without legal-sft@1" in out
    reg.publish(fake_adapter(tmp / "runs" / "s2", name="legal-sft", payload=b"v2"), name="legal-sft")
    code, out, _ = run_cli(capsys, "profile", "show", "oops", "--registry", root)
    assert "note: legal-sft@2 is newer than legal-sft@1; `adapterkit profile update oops` moves it" in out
    code, _, err = run_cli(capsys, "profile", "update", "oops", "--registry", root)
    assert code == 2 and err.count("\n") == 1 and "trained on top of legal-sft@1, but the stack holds legal-sft@2" in err
    code, out, _ = run_cli(capsys, "registry", "show", "med-ppo", "--registry", root)
    assert "└── med-sft@1" in out and "legal-sft" not in out
    orphan = fake_adapter(tmp / "runs" / "orphan", name="orphan", stage="dpo", payload=b"o",
                          parent=[{"name": "unpublished", "path": "/nowhere", "sha256": "f" * 64}])
    reg.publish(orphan, name="orphan")
    for argv in (["generate", "hi", "--adapter", "orphan"], ["merge", "orphan", "--out", str(tmp / "m")],
                 ["export", "orphan", "--out", str(tmp / "e")], ["profile", "set", "p", "orphan"]):
        code, _, err = run_cli(capsys, *argv, "--registry", root)
        assert code == 2 and err.count("\n") == 1 and "trained on top of unpublished" in err, argv
    assert not (tmp / "m").exists() and not (tmp / "e").exists()
