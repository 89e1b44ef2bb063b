"""The registry on its own: publish, resolve, verify, lineage, remove, gc, profiles, CLI.

Adapters here are small fake artifacts (PEFT file names, real manifests), so these tests
need no model; loading real entries with peft is in test_compose.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapterkit.artifact import MANIFEST, sha256_file, write_artifact
from adapterkit.errors import AdapterkitError, CompatibilityError, IntegrityError
from adapterkit.lineage import lineage, serving_stack, tree_lines
from adapterkit.profiles import get_profile, list_profiles, profile_entries, profiles_using, set_profile
from adapterkit.refs import parse_ref
from adapterkit.registry import Registry, RegistryError
from adapterkit.registry_gc import gc

BASE = {"source": "tiny", "fingerprint": {"id": "base0000"}, "quantization": "nf4", "compute_dtype": "float32"}


def fake_adapter(path, name="a", stage="sft", domain="legal", payload=b"weights", parent=(), base=BASE,
                 tags=()):
    """A PEFT-shaped artifact written the way stages write theirs."""
    def write(tmp):
        (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (tmp / "adapter_model.safetensors").write_bytes(payload)
    manifest = {"name": name, "version": None, "stage": stage, "domain": domain, "tags": list(tags),
                "base": base, "chat_template_sha256": "t0", "parent": list(parent), "recipe": {}}
    return write_artifact(path, write, manifest)


@pytest.fixture
def reg(tmp_path):
    return Registry.open(tmp_path / "adapters")


@pytest.fixture
def src(tmp_path):
    return fake_adapter(tmp_path / "runs" / "sft")


def test_publish_makes_immutable_versions(reg, src):
    first = reg.publish(src, name="legal-sft")
    second = reg.publish(src, name="legal-sft", domain="support", tags=["v2"])
    assert (first.ref, second.ref) == ("legal-sft@1", "legal-sft@2")
    assert reg.get("legal-sft").ref == reg.get("legal-sft@latest").ref == "legal-sft@2"
    assert reg.get("legal-sft@v1").domain == "legal" and second.domain == "support"
    on_disk = json.loads((second.path / MANIFEST).read_text())
    assert (on_disk["name"], on_disk["version"], on_disk["tags"]) == ("legal-sft", 2, ["v2"])
    assert "# legal-sft" in (second.path / "README.md").read_text()  # the card follows the name
    reg.verify("legal-sft@1")
    reg.verify("legal-sft@2")
    assert sorted(p.name for p in reg.root.iterdir() if not p.name.startswith("index.sqlite")) == \
        [".tmp", "legal-sft"]


def test_list_filters(reg, tmp_path):
    reg.publish(fake_adapter(tmp_path / "a", domain="legal", tags=["prod"]), name="a")
    reg.publish(fake_adapter(tmp_path / "b", stage="dpo", domain="legal"), name="b")
    other = dict(BASE, fingerprint={"id": "other000"})
    reg.publish(fake_adapter(tmp_path / "c", domain="support", base=other), name="c")
    refs = lambda es: [e.ref for e in es]  # noqa: E731
    assert refs(reg.list(domain="legal")) == ["a@1", "b@1"]
    assert refs(reg.list(stage="dpo")) == ["b@1"]
    assert refs(reg.list(base="other000")) == ["c@1"]
    assert refs(reg.list(tag="prod")) == ["a@1"]
    reg.publish(fake_adapter(tmp_path / "a2", payload=b"new"), name="a")
    assert refs(reg.list(name="a", latest=True)) == ["a@2"]


@pytest.mark.parametrize("bad", ["../x", "/abs/path", "a/b", "", ".hidden", "a..b", "x@y/z"])
def test_names_that_could_escape_are_refused(reg, src, bad):
    with pytest.raises(RegistryError, match="invalid adapter name"):
        reg.publish(src, name=bad)
    assert reg.list() == []


def test_unknown_name_and_version(reg, src):
    reg.publish(src, name="legal-sft")
    with pytest.raises(RegistryError, match=r"legal-sft@7: no such version .*legal-sft has versions 1"):
        reg.get("legal-sft@7")
    with pytest.raises(RegistryError, match=r"no adapter named 'nope' .*known: legal-sft"):
        reg.get("nope")
    with pytest.raises(RegistryError, match="a version is a number"):
        parse_ref("legal-sft@abc")


def test_tampered_and_truncated_files_are_named(reg, src):
    entry = reg.publish(src, name="legal-sft")
    weights = entry.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2])
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors: sha256 does not match"):
        reg.verify("legal-sft")
    assert "adapter_model.safetensors" in reg.verify_all()["legal-sft@1"]
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors"):
        reg.path("legal-sft")  # what every load goes through


def test_edited_manifest_is_caught(reg, src):
    entry = reg.publish(src, name="legal-sft")
    m = json.loads((entry.path / MANIFEST).read_text())
    m["base"]["fingerprint"]["id"] = "forged"
    (entry.path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="adapterkit.json: differs from the index"):
        reg.verify("legal-sft")


def test_tampered_source_is_not_published(reg, src):
    (src / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match=str(src / "adapter_model.safetensors")):
        reg.publish(src, name="legal-sft")
    assert reg.list() == [] and not (reg.root / "legal-sft").exists()


def test_lineage_tree(reg, tmp_path):
    sft = reg.publish(fake_adapter(tmp_path / "sft", name="sft"), name="legal-sft")
    parent = [{"name": "sft", "path": str(tmp_path / "sft"), "sha256": sft.weights_sha256},
              {"name": "lost", "path": "/gone", "sha256": "0" * 64}]
    dpo = reg.publish(fake_adapter(tmp_path / "dpo", stage="dpo", payload=b"dpo", parent=parent),
                      name="legal-dpo")
    tree = lineage(reg, dpo.ref)
    assert tree["ref"] == "legal-dpo@1"
    assert [p["ref"] for p in tree["parents"]] == ["legal-sft@1", None]
    text = "\n".join(tree_lines(tree))
    assert "├── legal-sft@1  [sft, legal, base base0000]" in text
    assert "└── lost (not in the registry: ../" in text  # paths are relative to the entry, never absolute
    assert str(tmp_path) not in (dpo.path / MANIFEST).read_text()
    with pytest.raises(RegistryError, match=r"legal-dpo@1 was trained on top of lost .*not in the registry.*--alone"):
        serving_stack(reg, dpo.ref)


def test_remove_and_gc(reg, src):
    reg.publish(src, name="legal-sft")
    reg.publish(src, name="legal-sft")
    with pytest.raises(RegistryError, match="say which version"):
        reg.remove("legal-sft")
    assert reg.remove("legal-sft@1") == ["legal-sft@1"]
    assert [e.ref for e in reg.list()] == ["legal-sft@2"] and not (reg.root / "legal-sft" / "1").exists()
    (reg.root / "legal-sft" / "9").mkdir()  # a version dir with no row
    (reg.root / ".tmp" / "deadbeef").mkdir()  # a staging dir with no owner
    removed = gc(reg)
    assert sorted(os.path.basename(p) for p in removed) == ["9", "deadbeef"]
    assert reg.remove("legal-sft@all") == ["legal-sft@2"]
    gc(reg)
    assert not (reg.root / "legal-sft").exists()


def test_profiles(reg, tmp_path):
    reg.publish(fake_adapter(tmp_path / "a"), name="legal-sft")
    reg.publish(fake_adapter(tmp_path / "b", payload=b"b", stage="dpo"), name="legal-dpo")
    p = set_profile(reg, "legal", ["legal-sft@1", "legal-dpo"])
    assert (p.domain, p.mode, p.stack) == ("legal", "stack", ["legal-sft@1", "legal-dpo@1"])  # pinned
    assert [e.ref for e in profile_entries(reg, "legal")] == ["legal-sft@1", "legal-dpo@1"]
    assert [q.name for q in list_profiles(reg)] == ["legal"] and profiles_using(reg, "legal-dpo") == ["legal"]
    with pytest.raises(RegistryError, match=r"profile 'legal' names 'legal-rm', which is not in the registry"):
        set_profile(reg, "legal", ["legal-sft", "legal-rm"])
    with pytest.raises(RegistryError, match="mode 'fold' is not one of stack, merge, export"):
        set_profile(reg, "legal", ["legal-sft"], mode="fold")
    reg.remove("legal-dpo@1")  # the profile now names a missing adapter: using it says so
    with pytest.raises(RegistryError, match=r"profile 'legal' names 'legal-dpo@1', which is not in the registry"):
        profile_entries(reg, "legal")
    with pytest.raises(RegistryError, match=r"no profile named 'nope' .*profiles: legal"):
        get_profile(reg, "nope")


def test_profile_refuses_mixed_bases(reg, tmp_path):
    reg.publish(fake_adapter(tmp_path / "a"), name="a")
    reg.publish(fake_adapter(tmp_path / "b", base=dict(BASE, fingerprint={"id": "other"})), name="b")
    with pytest.raises(CompatibilityError, match="trained on different bases .*a@1 on base0000, b@1 on other"):
        set_profile(reg, "mixed", ["a", "b"])
    assert set_profile(reg, "mixed", ["a", "b"], force=True).stack == ["a@1", "b@1"]


# -- crash safety and concurrency, in real processes ------------------------------------------

PUBLISH = textwrap.dedent("""
    import sys
    from adapterkit.registry import Registry
    root, src, name, n = sys.argv[1:5]
    reg = Registry.open(root)
    for _ in range(int(n)):
        reg.publish(src, name=name)
""")


def _publisher(root, src, name="legal-sft", n=1, pause=None):
    env = {**os.environ, "ADAPTERKIT_PUBLISH_PAUSE": pause or ""}
    return subprocess.Popen([sys.executable, "-c", PUBLISH, str(root), str(src), name, str(n)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _consistent(reg) -> None:
    """Every row has its verified directory; every directory has its row; no staging left."""
    rows = {(e.name, e.version) for e in reg.list()}
    dirs = {(d.parent.name, int(d.name)) for d in reg.root.glob("*/*") if not d.parent.name.startswith(".")}
    assert rows == dirs
    for e in reg.list():
        reg.verify(e.ref)
    assert list((reg.root / ".tmp").iterdir()) == []


@pytest.mark.parametrize("point", ["copied", "renamed", "inserted", "published"])
def test_publish_killed_midway_leaves_all_or_nothing(reg, src, point):
    proc = _publisher(reg.root, src, pause=point)
    assert proc.stdout.readline().strip() == f"paused at {point}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    entries = [e.ref for e in reg.list()]
    assert entries == (["legal-sft@1"] if point == "published" else [])  # the index: all or nothing
    if entries:
        reg.verify("legal-sft@1")  # and a whole entry, every file intact
    gc(reg)
    _consistent(reg)
    assert reg.publish(src, name="legal-sft").version == len(entries) + 1  # the registry still works


def test_concurrent_publishers_lose_nothing(reg, src):
    procs = [_publisher(reg.root, src, n=3) for _ in range(4)]
    procs.append(_publisher(reg.root, src, name="other", n=2))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert [e.version for e in reg.list(name="legal-sft")] == list(range(1, 13))
    assert [e.version for e in reg.list(name="other")] == [1, 2]
    _consistent(reg)


# -- the CLI ------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    from adapterkit.cli import main
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_registry_commands(tmp_path, src, capsys, monkeypatch):
    root = str(tmp_path / "reg")
    code, out, _ = run_cli(capsys, "publish", str(src), "--name", "legal-sft", "--domain", "legal",
                           "--registry", root)
    assert code == 0 and "published legal-sft@1" in out
    monkeypatch.setenv("ADAPTERKIT_REGISTRY", root)  # the environment names the root too
    code, out, _ = run_cli(capsys, "registry", "list", "--json")
    assert code == 0 and [e["ref"] for e in json.loads(out)] == ["legal-sft@1"]
    code, out, _ = run_cli(capsys, "registry", "show", "legal-sft", "--json")
    assert json.loads(out)["lineage"]["ref"] == "legal-sft@1"
    code, out, _ = run_cli(capsys, "registry", "show", "legal-sft")
    assert "lineage" in out and "legal-sft@1  [sft, legal" in out
    code, out, _ = run_cli(capsys, "profile", "set", "legal", "legal-sft@1")
    assert code == 0 and "legal-sft@1 [stack]" in out
    code, out, _ = run_cli(capsys, "profile", "list", "--json")
    assert json.loads(out)[0]["stack"] == ["legal-sft@1"]
    code, out, _ = run_cli(capsys, "registry", "verify")
    assert code == 0 and "legal-sft@1: ok" in out
    (Registry.open(root).get("legal-sft").path / "adapter_config.json").write_text("{}")
    code, out, err = run_cli(capsys, "registry", "verify")
    assert code == 2 and "adapter_config.json: sha256 does not match" in out and "1 of 1 entries failed" in err
    code, _, err = run_cli(capsys, "registry", "show", "legal-sft@4")
    assert code == 2 and err.startswith("error: legal-sft@4: no such version")
    code, _, err = run_cli(capsys, "publish", str(src), "--name", "../x")
    assert code == 2 and "invalid adapter name '../x'" in err
    code, out, err = run_cli(capsys, "registry", "remove", "legal-sft@1")
    assert code == 0 and "removed legal-sft@1" in out and "profiles name legal-sft: legal" in err
    leftover = tmp_path / "reg" / ".tmp" / "deadbeef"  # a staging folder no publisher owns
    leftover.mkdir()
    code, out, _ = run_cli(capsys, "registry", "gc", "--dry-run")
    assert code == 0 and f"would remove {leftover}" in out and leftover.is_dir()
    code, out, _ = run_cli(capsys, "registry", "gc")
    assert code == 0 and f"removed {leftover}" in out and not leftover.exists()
    code, out, _ = run_cli(capsys, "registry", "gc")
    assert code == 0 and out.strip() == "nothing to remove"


def test_publish_from_a_stage_config(tmp_path, src, monkeypatch):
    """What ``save_stage_artifact`` does when output.publish is set."""
    monkeypatch.chdir(tmp_path)
    entry = Registry.open(None).publish(src, name="legal-sft", domain="legal")
    assert entry.path == tmp_path / "adapters" / "legal-sft" / "1"
    assert sha256_file(entry.path / "adapter_model.safetensors") == entry.weights_sha256


def test_not_an_adapter(reg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterkitError, match="no adapterkit.json; not an adapterkit adapter"):
        reg.publish(tmp_path / "empty", name="x")


def test_pipeline_publish_step(tmp_path):
    """The quickstart's (``tiny_pipeline``'s) publishing: each step published as <prefix><step>
    when it is made, then the profile set to the best policy's serving stack."""
    from adapterkit.pipeline import FINISH, Run, finish_publish, publish
    from adapterkit.pipeline_config import PipelineConfig
    assert list(FINISH)[0] == "publish"  # the profile first; the frontier (pipeline.py) after it
    sft = fake_adapter(tmp_path / "run" / "sft", name="tiny-sft", domain="flip")
    sft_sha = sha256_file(sft / "adapter_model.safetensors")
    dpo = fake_adapter(tmp_path / "run" / "dpo", stage="dpo", domain="flip", payload=b"dpo",
                       parent=[{"name": "tiny-sft", "path": str(sft), "sha256": sft_sha}])
    rm = fake_adapter(tmp_path / "run" / "reward", stage="reward", domain="flip", payload=b"rm")
    config = PipelineConfig(out=str(tmp_path / "run"), publish={"prefix": "tiny-", "profile": "flip"},
                            stages={"sft": {"recipe": "tiny_sft"}, "reward": {"recipe": "tiny_reward"},
                                    "dpo": {"recipe": "tiny_dpo", "parent": ["sft"]}})
    run = Run(config, Registry.open(tmp_path / "run" / "adapters"))
    run.summary["stages"] = {"base": {"score": 0.2}, "sft": {"adapter": str(sft), "score": 0.5},
                             "reward": {"adapter": str(rm), "accuracy": 0.9},
                             "dpo": {"adapter": str(dpo), "score": 0.8}}
    for name, folder in (("sft", sft), ("reward", rm), ("dpo", dpo)):
        run.refs[name] = publish(run, name, folder, "general").ref
    finish_publish(run)
    assert run.summary["registry"] == str(tmp_path / "run" / "adapters") and run.summary["profile"] == "flip"
    reg = Registry.open(run.summary["registry"])
    assert [e.ref for e in reg.list()] == ["tiny-dpo@1", "tiny-reward@1", "tiny-sft@1"]
    assert {e.domain for e in reg.list()} == {"general"}  # the stage's domain, none in the pipeline's publish
    assert get_profile(reg, "flip").stack == ["tiny-sft@1", "tiny-dpo@1"]
    assert run.summary["registry_tree"][0].startswith("tiny-dpo@1") and "tiny-sft@1" in run.summary["registry_tree"][1]


def test_the_shipped_adapters_folder_becomes_a_registry_and_keeps_its_readme(tmp_path, src, monkeypatch, capsys):
    """``./adapters`` ships holding only its README: the first publish makes it a registry (the
    README is no stranger's file), and gc and remove never delete it; a folder with anything
    else is still refused."""
    from adapterkit.cli import main
    shipped = Path(__file__).resolve().parents[1] / "adapters" / "README.md"
    (tmp_path / "adapters").mkdir()
    readme = tmp_path / "adapters" / "README.md"
    readme.write_bytes(shipped.read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERKIT_REGISTRY", raising=False)
    assert not Registry.open(None).created and main(["registry", "list"]) == 2  # not a registry yet
    assert main(["publish", str(src), "--name", "legal-sft"]) == 0
    assert main(["publish", str(src), "--name", "legal-sft"]) == 0
    reg = Registry.open(None)
    assert reg.root == tmp_path / "adapters" and [e.ref for e in reg.list()] == ["legal-sft@1", "legal-sft@2"]
    (tmp_path / "adapters" / ".tmp" / "leftover").mkdir()  # what a killed publish leaves
    assert main(["registry", "gc"]) == 0 and main(["registry", "remove", "legal-sft@all"]) == 0
    assert main(["registry", "gc"]) == 0 and reg.list() == []
    assert readme.read_bytes() == shipped.read_bytes()
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir() if not p.name.startswith("index.sqlite")) \
        == [".tmp", "README.md"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("mine")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError, match="not an adapterkit registry"):
        Registry.open(other)
