import json

import pytest

from adapterkit.data import (apply_length_policy, check_chat_contract, load_data, read_rows,
                             split_last_turn, validate_rows)
from adapterkit.errors import DataError

SFT = ("messages", "prompt_completion", "text")
GOOD = {"messages": [{"role": "user", "content": "flip: hot"}, {"role": "assistant", "content": "cold"}]}


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 2, field 'messages[0].role': the conversation must end with a assistant turn"),
    ({"messages": "hello"}, "row 2, field 'messages': expected a non-empty list of messages, got str"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}, "row 2, field 'messages[0].content': empty text"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "row 2, field 'messages[0].role': expected a user turn here, got assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "row 2, field 'messages[1].role': expected a assistant turn here, got user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "row 2, field 'messages[1].role': a system message may only come first"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "row 2, field 'messages[0].role': unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "row 2, field 'messages[0].content': expected text, got int"),
])
def test_message_errors_name_file_row_field(tmp_path, row, message):
    path = jsonl(tmp_path, [GOOD, row])
    with pytest.raises(DataError) as err:
        load_data(path, fmt="auto", allowed=SFT)
    assert str(err.value) == f"{path}, {message}" or str(err.value).startswith(f"{path}, {message}")


def test_missing_key_and_wrong_type(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"row 2, field 'completion': missing"):
        load_data(path, fmt="prompt_completion", allowed=SFT)
    path = jsonl(tmp_path, [{"text": "fine"}, {"text": ["not", "text"]}], "t.jsonl")
    with pytest.raises(DataError, match=r"t.jsonl, row 2, field 'text': expected text, got list"):
        load_data(path, fmt="auto", allowed=SFT)


def test_preference_rows(tmp_path):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    bad = dict(good, rejected="plain")
    path = jsonl(tmp_path, [good, bad])
    with pytest.raises(DataError, match=r"row 2, field 'rejected': expected a non-empty list"):
        load_data(path, fmt="auto", allowed=("preference",))
    mixed = {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}
    with pytest.raises(DataError, match="conversational, but 'prompt' is plain text"):
        validate_rows([mixed], "preference", "x.jsonl", ("preference",))


def test_bad_json_line_and_unknown_format(tmp_path):
    path = jsonl(tmp_path, [GOOD, "{not json"])
    with pytest.raises(DataError, match=r"d.jsonl, row 2: not valid JSON"):
        read_rows(path)
    path = jsonl(tmp_path, [{"question": "q"}], "q.jsonl")
    with pytest.raises(DataError, match=r"row 1: cannot tell the format from fields \['question'\]"):
        load_data(path, fmt="auto", allowed=SFT)
    with pytest.raises(DataError, match="format 'preference' does not fit this stage"):
        validate_rows([{"chosen": "a", "rejected": "b"}], "auto", "p.jsonl", SFT)
    with pytest.raises(DataError, match="no such file"):
        read_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_rows(str(tmp_path / "x.txt"))


def test_every_file_kind_loads(tmp_path):
    import datasets
    rows = [{"prompt": "flip: hot", "completion": "cold"}, {"prompt": "flip: up", "completion": "down"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("prompt,completion\nflip: hot,cold\nflip: up,down\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for src in ["a.json", "a.csv", "a.parquet", "saved"]:
        loaded = load_data(str(tmp_path / src), fmt="auto", allowed=SFT)
        assert loaded.format == "prompt_completion" and loaded.rows == rows, src


def test_long_rows_error_truncate_drop(tmp_path, tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir / "base")
    rows = [GOOD, {"messages": [{"role": "user", "content": "flip: " + "hot " * 40},
                                {"role": "assistant", "content": "cold"}]}]
    with pytest.raises(DataError, match=r"f.jsonl, row 2, field 'messages': \d+ tokens, longer than data.max_length=16"):
        apply_length_policy(rows, "messages", tok, 16, "error", "f.jsonl")
    kept, report = apply_length_policy(rows, "messages", tok, 16, "drop", "f.jsonl")
    assert kept == [GOOD] and report["dropped"] == 1
    kept, report = apply_length_policy(rows, "messages", tok, 16, "truncate", "f.jsonl")
    assert len(kept) == 2 and report["truncated"] == 1


def test_chat_contract(tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir / "base")
    check_chat_contract(tok)
    tok.pad_token = tok.eos_token
    with pytest.raises(DataError, match="pad token must exist and differ from the EOS token"):
        check_chat_contract(tok, "my-base")


def test_split_last_turn():
    assert split_last_turn([GOOD]) == [{"prompt": GOOD["messages"][:1], "completion": GOOD["messages"][1:]}]
