"""Issue #14's table: every bad input a careful but hostile user tried, through the CLI.

Each row builds its folder, runs ``adapterkit.cli.main`` in this process and asserts: exit 2,
one line on stderr starting ``error:`` with the expected words, no traceback, and that no file
anywhere under the test's folder was created, changed or deleted (a snapshot of the tree,
taken before and after). Nearly every row fails before a model loads, so the table is fast;
two rows run in a subprocess to prove "no traceback" end to end. RELIABILITY.md counts them.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterkit.artifact import MANIFEST, sha256_file, write_artifact
from adapterkit.cli import main
from helpers import child_env

BASE_FP = {"id": "base0000", "weights": "w"}


# -- helpers -------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (folders: "dir"; links: their target).
    SQLite's own side files of an existing registry index (-wal, -shm) come and go with any
    reader, so they are left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if name in ("index.sqlite-wal", "index.sqlite-shm"):
                continue
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def adapter(path: Path, stage: str = "sft", name: str | None = None, payload: bytes = b"weights",
            base: dict | None = None, files_extra: dict | None = None, recipe: dict | None = None) -> Path:
    """A PEFT-shaped adapterkit artifact (fake weights), written the way stages write theirs."""
    def write(tmp):
        (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (tmp / "adapter_model.safetensors").write_bytes(payload)
    manifest = {"name": name or stage, "version": None, "stage": stage, "domain": "d", "tags": [],
                "base": base or {"source": "tiny", "fingerprint": BASE_FP, "quantization": "nf4"},
                "chat_template_sha256": None, "parent": [], "recipe": recipe or {}}
    write_artifact(path, write, manifest)
    if files_extra:
        edit_manifest(path, lambda m: m["files"].update(files_extra))
    return path


def edit_manifest(path: Path, change) -> None:
    m = json.loads((path / MANIFEST).read_text())
    change(m)
    (path / MANIFEST).write_text(json.dumps(m))


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIR = {"prompt": "flip: hot", "chosen": "cold", "rejected": "hot"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def registry_with(tmp: Path, *adapters_: tuple[str, Path]) -> Path:
    """A real registry at tmp/reg holding the given (name, adapter dir) entries."""
    from adapterkit.registry import Registry
    reg = Registry.open(tmp / "reg")
    for name, src in adapters_:
        reg.publish(src, name=name)
    return reg.root


def evil_base(tmp: Path) -> Path:
    """A base whose config asks for remote code that, if ever imported, leaves a marker file."""
    base = tmp / "evilbase"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "evilmodel", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (base / "evil.py").write_text(f"open({str(tmp / 'PWNED')!r}, 'w').write('ran')\n")
    return base


def evil_reward(tmp: Path, matching: bool = True) -> Path:
    """A reward adapter whose manifest names ``evil_base`` with trust_remote_code: true."""
    from adapterkit.base import weights_part
    base = evil_base(tmp)
    fp = {"id": "evil", "weights": weights_part(base) if matching else "0" * 64}
    recipe = {"base": {"name": str(base), "trust_remote_code": True, "quantization": "none"}}
    return adapter(tmp / "rm", stage="reward", base={"source": str(base), "fingerprint": fp,
                                                      "quantization": "none"}, recipe=recipe)


# -- the table: (id, setup(tmp) -> (argv, words the one-line error must hold)) --------------------

def _gc_project(tmp):
    (tmp / "x" / "proj" / "src").mkdir(parents=True)
    (tmp / "x" / "proj" / "src" / "main.py").write_text("print(1)\n")
    return ["registry", "gc", "--registry", "x"], "not an adapterkit registry"


def _gc_default_package(tmp):
    (tmp / "adapters" / "lora").mkdir(parents=True)
    (tmp / "adapters" / "__init__.py").write_text("")
    (tmp / "adapters" / "lora" / "layer.py").write_text("X = 1\n")
    return ["registry", "gc"], "not an adapterkit registry"


def _traversal(target):
    def setup(tmp):
        evil = tmp / "evil.txt"
        evil.write_text("mine")
        src = adapter(tmp / "runs" / "a", files_extra={target(tmp): sha256_file(evil)})
        (tmp / "reg").mkdir()
        return ["publish", str(src), "--registry", str(tmp / "reg")], "not a plain file name"
    return setup


def _symlink_out(tmp):
    (tmp / "secret").write_text("s")
    src = adapter(tmp / "runs" / "a")
    (src / "notes.txt").symlink_to(tmp / "secret")
    edit_manifest(src, lambda m: m["files"].update({"notes.txt": sha256_file(tmp / "secret")}))
    return ["publish", str(src), "--registry", str(tmp / "reg")], "symlink that leads outside"


def _bin_only(tmp):
    src = adapter(tmp / "runs" / "a")
    os.rename(src / "adapter_model.safetensors", src / "adapter_model.bin")
    edit_manifest(src, lambda m: m["files"].update(
        {"adapter_model.bin": m["files"].pop("adapter_model.safetensors")}))
    return ["publish", str(src), "--registry", str(tmp / "reg")], "safetensors weights only"


def _corrupt_manifest(tmp):
    src = adapter(tmp / "runs" / "a")
    (src / MANIFEST).write_text("{not json")
    return ["publish", str(src), "--registry", str(tmp / "reg")], "corrupt manifest"


def _files_not_mapping(tmp):
    src = adapter(tmp / "runs" / "a")
    edit_manifest(src, lambda m: m.update(files=["adapter_model.safetensors"]))
    return ["publish", str(src), "--registry", str(tmp / "reg")], "not a mapping"


def _tampered_source(tmp):
    src = adapter(tmp / "runs" / "a")
    (src / "adapter_model.safetensors").write_bytes(b"evil")
    return ["publish", str(src), "--registry", str(tmp / "reg")], "sha256 does not match"


def _sft_over(make):
    def setup(tmp):
        make(tmp / "x" / "mine")
        return ["sft", "tiny_sft", "train.max_steps=1", "output.dir=x/mine"], "refusing to replace it"
    return setup


def _notes(d: Path):
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("notes")


def _sft_over_file(tmp):
    (tmp / "out").write_text("a file")
    return ["sft", "tiny_sft", "output.dir=out"], "exists and is not a folder"


def _sft_under_file(tmp):
    (tmp / "f").write_text("a file")
    return ["sft", "tiny_sft", "output.dir=f/out"], "not a writable folder"


def _tiny_over(tmp):
    _notes(tmp / "t")
    return ["tiny", "--out", "t"], "refusing to replace it"


def _profile_registry(tmp):
    root = registry_with(tmp, ("a", adapter(tmp / "runs" / "a")))
    assert main(["profile", "set", "p", "a", "--registry", str(root)]) == 0
    _notes(tmp / "out")
    return root


def _merge_over(tmp):
    root = _profile_registry(tmp)
    return ["merge", "p", "--out", "out", "--registry", str(root)], "--out out: already holds"


def _export_over(tmp):
    root = _profile_registry(tmp)
    return ["export", "p", "--out", "out", "--registry", str(root)], "--out out: already holds"


def _score_evil(matching):
    def setup(tmp):
        jsonl(tmp / "pairs.jsonl", [PAIR])
        return ["score", "--reward", str(evil_reward(tmp, matching)), "pairs.jsonl"], \
            ("cannot load" if matching else "not that base's")
    return setup


def _generate_evil(tmp):
    root = registry_with(tmp, ("rm", evil_reward(tmp)))
    return ["generate", "hi", "--adapter", "rm", "--registry", str(root)], "cannot load"


def _dpo_with(parent=None, reward=None, rows=(PAIR,), expect=""):
    def setup(tmp):
        jsonl(tmp / "pairs.jsonl", list(rows))
        p = parent(tmp) if parent else adapter(tmp / "sft")
        argv = ["dpo", "tiny_dpo", f"dpo.parent=[{p}]", "data.train=pairs.jsonl", "data.eval=null",
                "output.dir=out"]
        if reward:
            argv.append(f"dpo.reward={reward(tmp)}")
        return argv, expect
    return setup


def _truncated(tmp):
    a = adapter(tmp / "sft", payload=b"0123456789")
    (a / "adapter_model.safetensors").write_bytes(b"01234")
    return a


def _no_manifest(tmp):
    a = adapter(tmp / "sft")
    (a / MANIFEST).unlink()
    return a


def _bin_parent(tmp):
    a = adapter(tmp / "sft")
    os.rename(a / "adapter_model.safetensors", a / "adapter_model.bin")
    return a


def _ppo_reward_is_sft(tmp):
    jsonl(tmp / "prompts.jsonl", [{"prompt": "flip: hot"}])
    return ["ppo", "tiny_ppo", f"ppo.reward={adapter(tmp / 'sft')}", "ppo.parent=[]",
            "data.train=prompts.jsonl", "data.eval=null", "output.dir=out"], \
        "a sft adapter cannot be the reward model"


def _score_with_sft(tmp):
    jsonl(tmp / "pairs.jsonl", [PAIR])
    return ["score", "--reward", str(adapter(tmp / "sft")), "pairs.jsonl"], "cannot be the reward model"


def _sft_data(source_setup, expect, *extra):
    def setup(tmp):
        source = source_setup(tmp)
        return ["sft", "tiny_sft", f"data.train={source}", "data.eval=null", "output.dir=out", *extra], expect
    return setup


def _base(name, expect):
    def setup(tmp):
        jsonl(tmp / "chat.jsonl", [CHAT])
        return ["sft", "tiny_sft", f"base.name={name}", "data.train=chat.jsonl", "data.eval=null",
                "output.dir=out"], expect
    return setup


def _registry_cmd(*argv, expect, make=None):
    def setup(tmp):
        if make:
            make(tmp)
        return list(argv), expect
    return setup


def _newer_schema(tmp):
    import sqlite3
    root = registry_with(tmp, ("a", adapter(tmp / "runs" / "a")))
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    return ["registry", "list", "--registry", str(root)], "schema version 99 is newer"


def _other_stage_recipe(tmp):
    (tmp / "r.yaml").write_text("stage: dpo\n")
    return ["sft", "r.yaml"], "this recipe is for 'dpo'"


def _bad_yaml_recipe(tmp):
    (tmp / "r.yaml").write_text("train: [unclosed\n")
    return ["sft", "r.yaml"], "not valid YAML"


def _no_template_base(tmp):
    """A copy of the tiny base whose tokenizer has no chat template."""
    import shutil
    from adapterkit.tiny import ensure_tiny
    base = tmp / "plainbase"
    shutil.copytree(ensure_tiny() / "base", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    jsonl(tmp / "chat.jsonl", [CHAT])
    return ["sft", "tiny_sft", f"base.name={base}", "data.train=chat.jsonl", "data.eval=null",
            "output.dir=out"], "has no chat template; set data.chat_template"


def _one_reg(tmp):
    registry_with(tmp, ("a", adapter(tmp / "runs" / "a")))


ROWS = [
    # 1. the registry only ever acts on a folder that says it is one
    ("gc-project-folder", _gc_project),
    ("gc-default-adapters-package", _gc_default_package),
    ("list-project-folder", lambda t: (_gc_project(t)[0][:1] + ["list", "--registry", "x"], "not an adapterkit registry")),
    ("list-missing-registry", _registry_cmd("registry", "list", "--registry", "nope", expect="no adapterkit registry")),
    ("verify-empty-folder", _registry_cmd("registry", "verify", "--registry", "empty", expect="no adapterkit registry",
                                          make=lambda t: (t / "empty").mkdir())),
    ("show-missing-registry", _registry_cmd("registry", "show", "a", "--registry", "nope", expect="no adapterkit registry")),
    ("remove-missing-registry", _registry_cmd("registry", "remove", "a@1", "--registry", "nope",
                                              expect="no adapterkit registry")),
    ("profile-set-missing-registry", _registry_cmd("profile", "set", "p", "a", "--registry", "nope",
                                                   expect="no adapterkit registry")),
    ("publish-into-project-folder", lambda t: (_gc_project(t), ["publish", str(adapter(t / "runs" / "a")),
                                                                 "--registry", "x"])[1:] + ("not an adapterkit registry",)),
    ("registry-newer-schema", _newer_schema),
    # 3. paths from a manifest stay inside their folder
    ("publish-manifest-dotdot", _traversal(lambda t: "../../../evil.txt")),
    ("publish-manifest-absolute", _traversal(lambda t: str(t / "evil.txt"))),
    ("publish-manifest-subfolder", _traversal(lambda t: "sub/evil.txt")),
    ("publish-manifest-symlink-out", _symlink_out),
    ("publish-bin-only", _bin_only),
    ("publish-corrupt-manifest", _corrupt_manifest),
    ("publish-files-not-mapping", _files_not_mapping),
    ("publish-tampered-source", _tampered_source),
    ("publish-bad-name", lambda t: (["publish", str(adapter(t / "runs" / "a")), "--name", "../x",
                                     "--registry", "reg"], "invalid adapter name")),
    # 2. nothing the user owns is replaced without being asked
    ("sft-over-user-folder", _sft_over(_notes)),
    ("sft-over-dpo-adapter", _sft_over(lambda d: adapter(d, stage="dpo"))),
    ("sft-over-file", _sft_over_file),
    ("sft-output-under-a-file", _sft_under_file),
    ("tiny-out-over-user-folder", _tiny_over),
    ("merge-out-over-user-folder", _merge_over),
    ("export-out-over-user-folder", _export_over),
    # 4. no code from someone else's manifest
    ("score-evil-base-remote-code", _score_evil(True)),
    ("score-evil-base-wrong-fingerprint", _score_evil(False)),
    ("generate-evil-base-remote-code", _generate_evil),
    # 5. no silent wrong results
    ("recipe-path-missing", lambda t: (["sft", "nope/tiny_sft.yaml"], "no such recipe file")),
    ("recipe-file-name-missing", lambda t: (["sft", "tiny_sft.yaml"], "no such recipe file")),
    ("dpo-parent-is-reward", _dpo_with(parent=lambda t: adapter(t / "rm", stage="reward"),
                                       expect="a reward adapter cannot be the parent")),
    ("dpo-reward-is-sft", _dpo_with(reward=lambda t: adapter(t / "sft2", payload=b"x"),
                                    expect="a sft adapter cannot be the reward model")),
    ("ppo-reward-is-sft", _ppo_reward_is_sft),
    ("score-reward-is-sft", _score_with_sft),
    ("dpo-parent-truncated-weights", _dpo_with(parent=_truncated, expect="sha256 does not match")),
    ("dpo-parent-no-manifest", _dpo_with(parent=_no_manifest, expect="no adapterkit.json")),
    ("dpo-parent-bin-only", _dpo_with(parent=_bin_parent, expect="adapter_model.bin is pickle")),
    ("dpo-chosen-equals-rejected", _dpo_with(rows=[PAIR, {**PAIR, "rejected": "cold"}],
                                             expect="row 2, field 'rejected': the same as 'chosen'")),
    # 6. one line, before the model loads
    ("data-relative-folder-missing", _sft_data(lambda t: (t / "data").mkdir() or "data/nope", "no such file")),
    ("data-hub-name-offline", _sft_data(lambda t: "nobody/nothing", "the hub is offline")),
    ("data-bad-json", _sft_data(lambda t: (t / "d.jsonl").write_text("{x\n") and "d.jsonl", "row 1: not valid JSON")),
    ("data-unsupported-type", _sft_data(lambda t: (t / "d.txt").write_text("x") and "d.txt", "unsupported file type")),
    ("data-missing-field", _sft_data(lambda t: jsonl(t / "d.jsonl", [{"messages": None}]).name, "field 'messages': missing")),
    ("data-preference-for-sft", _sft_data(lambda t: jsonl(t / "d.jsonl", [PAIR]).name, "does not fit this stage")),
    ("chat-template-not-a-file", _sft_data(lambda t: jsonl(t / "d.jsonl", [CHAT]).name, "neither a Jinja template",
                                           "data.chat_template=nofile.jinja")),
    ("base-without-chat-template", _no_template_base),
    ("base-missing-folder", _base("./no-such-base", "no such directory")),
    ("base-not-reachable", _base("nobody/no-such-model", "cannot load its tokenizer")),
    # already handled before this issue; kept so that they stay so
    ("config-unknown-key", lambda t: (["sft", "tiny_sft", "train.learning_rat=1"], "unknown key")),
    ("config-wrong-type", lambda t: (["sft", "tiny_sft", "lora.r=abc"], "lora.r")),
    ("config-impossible-value", lambda t: (["sft", "tiny_sft", "lora.r=0"], "lora.r")),
    ("config-bad-override", lambda t: (["sft", "tiny_sft", "lora.r"], "expected key.sub=value")),
    ("config-other-stage-recipe", _other_stage_recipe),
    ("config-bad-yaml", _bad_yaml_recipe),
    ("ppo-no-reward", lambda t: (["ppo", "tiny_ppo", "ppo.reward=null"], "ppo.reward: ")),
    ("show-unknown-version", _registry_cmd("registry", "show", "a@4", "--registry", "reg",
                                           expect="a@4: no such version", make=_one_reg)),
    ("show-bad-version", _registry_cmd("registry", "show", "a@abc", "--registry", "reg",
                                       expect="a version is a number", make=_one_reg)),
    ("generate-nothing-named", _registry_cmd("generate", "hi", "--registry", "reg", expect="give --profile",
                                             make=_one_reg)),
    ("profile-unknown-method", _registry_cmd("profile", "set", "p", "a", "--method", "avg", "--registry", "reg",
                                             expect="unknown merge method", make=_one_reg)),
    ("merge-unknown-profile", _registry_cmd("merge", "nope", "--out", "o", "--registry", "reg",
                                            expect="no profile named 'nope'", make=_one_reg)),
]


NEEDS_TINY = {"chat-template-not-a-file", "base-without-chat-template"}  # they load the tiny tokenizer


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row, tmp_path, monkeypatch, capsys, request, ak_home):
    name, setup = row
    if name in NEEDS_TINY:
        request.getfixturevalue("tiny_dir")  # built once per session, outside this row's folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERKIT_REGISTRY", raising=False)
    argv, expected = setup(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # nothing created, changed or removed
    assert not (tmp_path / "PWNED").exists()  # no code from a manifest ran


def test_table_has_at_least_40_rows():
    assert len(ROWS) >= 40 and len({r[0] for r in ROWS}) == len(ROWS)


# -- end to end in a subprocess: no traceback, exit 2 ---------------------------------------------

@pytest.mark.parametrize("setup", [_gc_project, _score_evil(True)], ids=["gc-project", "score-evil-base"])
def test_subprocess_one_line_exit_2(setup, tmp_path, ak_home):
    argv, expected = setup(tmp_path)
    before = snapshot(tmp_path)
    env = child_env(ADAPTERKIT_REGISTRY="")  # this checkout, whatever is installed
    proc = subprocess.run([sys.executable, "-m", "adapterkit", *argv], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert snapshot(tmp_path) == before and not (tmp_path / "PWNED").exists()


# -- what is allowed, and the leftovers ---------------------------------------------------------

def test_gc_dry_run_then_gc_removes_only_its_own(tmp_path, capsys):
    from adapterkit.registry import Registry
    from adapterkit.registry_gc import gc
    root = registry_with(tmp_path, ("a", adapter(tmp_path / "runs" / "a")))
    (root / "a" / "7").mkdir()  # a version folder of its own name with no row
    (root / ".tmp" / "deadbeef").mkdir()  # a staging folder with no owner
    (root / "notes").mkdir()  # the user's folder beside the registry's: never touched
    (root / "notes" / "3").mkdir()
    before = snapshot(tmp_path)
    assert main(["registry", "gc", "--dry-run", "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and "a/7" in out and "deadbeef" in out and "notes" not in out
    assert snapshot(tmp_path) == before
    assert sorted(Path(p).name for p in gc(Registry.open(root))) == ["7", "deadbeef"]
    assert (root / "notes" / "3").is_dir() and (root / "a" / "1").is_dir()


def test_same_adapter_may_be_replaced_and_overwrite_is_explicit(tmp_path):
    from adapterkit.config import load_config
    from adapterkit.errors import OutputError
    from adapterkit.preflight import check_output
    config = load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'sft'}"])
    adapter(tmp_path / "sft", stage="sft", name=config.output.name or "sft")
    check_output(config)  # the same job again: replacing its own adapter is allowed
    adapter(tmp_path / "dpo", stage="dpo", name=config.output.name or "sft")
    with pytest.raises(OutputError, match="already holds the dpo adapter"):
        check_output(load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'dpo'}"]))
    _notes(tmp_path / "mine")
    with pytest.raises(OutputError, match="refusing to replace it"):
        check_output(load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'mine'}"]))
    check_output(load_config("sft", "tiny_sft", [f"output.dir={tmp_path / 'mine'}", "output.overwrite=true"]))


def test_replace_dir_never_leaves_the_target_missing(tmp_path):
    from adapterkit.safety import replace_dir
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone too


KILLED_WRITER = """
import sys, time
from adapterkit.artifact import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half").write_text("x")
    print("writing", flush=True)
    time.sleep(3600)
"""


def test_a_killed_writer_leaves_nothing_the_next_one_keeps(tmp_path):
    """kill -9 mid-write leaves a locked temp sibling; the next write to that output sweeps it."""
    import signal
    from adapterkit.artifact import atomic_dir
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with atomic_dir(out) as tmp:
        (tmp / "whole").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "whole").is_file()


def test_nan_loss_stops_with_a_message():
    from adapterkit.errors import TrainingDiverged
    from adapterkit.stages.common import check_finite
    check_finite({"loss": 0.5}, "step 3")
    with pytest.raises(TrainingDiverged, match=r"step 3: loss=nan; the run stopped"):
        check_finite({"loss": float("nan"), "lr": 1e-4}, "step 3")
    with pytest.raises(TrainingDiverged, match="inf"):
        check_finite({"value_loss": float("inf")}, "ppo step 2", "the last good checkpoint is kept")
