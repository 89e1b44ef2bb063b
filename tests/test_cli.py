import json
import subprocess
import sys

from adapterkit.cli import main


def test_config_error_is_a_message_not_a_traceback(capsys):
    assert main(["sft", "tiny_sft", "train.learning_rat=1"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rat: unknown key" in err and "Traceback" not in err


def test_data_error_from_the_command_line(tmp_path, ak_home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "adapterkit", "sft", "tiny_sft", f"data.train={bad}",
                           "data.eval=null", f"output.dir={out}"], capture_output=True, text=True,
                          env={**__import__("os").environ})
    assert proc.returncode == 2
    assert f"{bad}, row 1, field 'messages[0].role': the conversation must end with a assistant turn" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".never*"))  # nothing half written


def test_help_lists_the_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for name in ["tiny", "sft", "quickstart", "recipes", "frontier"]:
        assert name in out


def test_tiny_command_writes_the_contract(tmp_path, capsys, ak_home):
    from adapterkit.tiny import ensure_tiny
    assert main(["tiny", "--out", str(tmp_path / "t"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base"] == str(tmp_path / "t" / "base")
    for name in ["base/model.safetensors", "base/tokenizer.json", "data/sft.jsonl", "data/prompts_eval.jsonl"]:
        assert (tmp_path / "t" / name).read_bytes() == (ensure_tiny() / name).read_bytes(), name
