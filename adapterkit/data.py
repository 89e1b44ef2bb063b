"""Dataset formats, loading and validation, and the chat-template contract.

Every row is checked before training starts; an error names the file, the row (1-based,
as a person counts them in the file) and the field.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adapterkit.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class LoadedData:
    rows: list[dict]
    format: str
    source: str
    report: dict = field(default_factory=dict)  # {"truncated": n, "dropped": n}


# -- readers: a registry by file suffix ---------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, row {i}: not valid JSON ({err.msg})") from None
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[dict]:
    import datasets
    return datasets.Dataset.from_parquet(str(path)).to_list()


READERS: dict[str, Callable[[Path], list[dict]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
}


def read_rows(source: str, hub_split: str = "train") -> list[dict]:
    """Rows from a file, a ``save_to_disk`` folder, a registered scheme (``tiny:<split>``, see
    ``resolvers.py``), or a hub dataset name."""
    from adapterkit.resolvers import resolve_data
    source = resolve_data(source)
    path = Path(source)
    if path.is_file():
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
        rows = reader(path)
    elif path.is_dir():
        import datasets
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[hub_split]
        rows = ds.to_list()
    elif not looks_like_hub_name(source):
        raise DataError(f"{source}: no such file or directory")
    else:  # an online user's hub dataset, "org/name" (or "hub:org/name")
        rows = _read_hub(source.removeprefix("hub:"), hub_split)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_name(source: str) -> bool:
    """``hub:anything``, or ``org/name`` whose first part is not a local folder: a relative
    path to a folder that does not exist is a typo, never a hub dataset of the same name."""
    if source.startswith("hub:"):
        return True
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
            and Path(parts[1]).suffix.lower() not in READERS and not Path(parts[0]).exists())


def _read_hub(name: str, split: str) -> list[dict]:
    if offline():
        raise DataError(f"{name}: no such file or directory, and the hub is offline "
                        "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) so it is not a hub dataset either")
    import datasets
    try:
        return datasets.load_dataset(name, split=split).to_list()
    except (OSError, ValueError, FileNotFoundError) as err:
        raise DataError(f"{name}: not a local file, and not a readable hub dataset "
                        f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None


# -- formats: a registry of row validators -------------------------------------------------

def _fail(where: str, field_: str, msg: str) -> DataError:
    return DataError(f"{where}, field '{field_}': {msg}")


def _need(row: dict, key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise _fail(where, key, "missing")
    return row[key]


def _check_text(value: Any, where: str, field_: str) -> None:
    if not isinstance(value, str):
        raise _fail(where, field_, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, field_, "empty text")


def _check_messages(value: Any, where: str, field_: str, last: str | None) -> None:
    """A conversation: optional system first, then user/assistant turns that alternate."""
    if not isinstance(value, list) or not value:
        raise _fail(where, field_, f"expected a non-empty list of messages, got {type(value).__name__}")
    expected = "user"
    for i, m in enumerate(value):
        f = f"{field_}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _fail(where, f, "expected a message with 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise _fail(where, f"{f}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        _check_text(m["content"], where, f"{f}.content")
        if role == "system":
            if i != 0:
                raise _fail(where, f"{f}.role", "a system message may only come first")
            continue
        if role != expected:
            raise _fail(where, f"{f}.role", f"expected a {expected} turn here, got {role}")
        expected = "assistant" if role == "user" else "user"
    if last is not None and value[-1]["role"] != last:
        raise _fail(where, f"{field_}[{len(value) - 1}].role", f"the conversation must end with a {last} turn")


def _check_turns(value: Any, where: str, field_: str, role: str) -> None:
    """Completions in conversational form: assistant messages only."""
    if not isinstance(value, list) or not value:
        raise _fail(where, field_, f"expected a non-empty list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") != role:
            raise _fail(where, f"{field_}[{i}].role", f"expected a {role} message")
        _check_text(m.get("content"), where, f"{field_}[{i}].content")


def _conversational(row: dict, key: str) -> bool:
    return isinstance(row.get(key), list)


def _check_prompt(row: dict, where: str) -> None:
    prompt = _need(row, "prompt", where)
    if isinstance(prompt, list):
        _check_messages(prompt, where, "prompt", last="user")
    else:
        _check_text(prompt, where, "prompt")


def _check_answer(row: dict, key: str, where: str) -> None:
    value = _need(row, key, where)
    if _conversational(row, "prompt"):
        _check_turns(value, where, key, "assistant")
    elif isinstance(value, list):
        raise _fail(where, key, "conversational, but 'prompt' is plain text; use the same form for both")
    else:
        _check_text(value, where, key)


def _validate_messages(row, where):
    _check_messages(_need(row, "messages", where), where, "messages", last="assistant")


def _validate_prompt_completion(row, where):
    _check_prompt(row, where)
    _check_answer(row, "completion", where)


def _validate_text(row, where):
    _check_text(_need(row, "text", where), where, "text")


def _validate_preference(row, where):
    if "prompt" in row:
        _check_prompt(row, where)
    for key in ("chosen", "rejected"):
        _check_answer(row, key, where)
    if row["chosen"] == row["rejected"]:  # the pair's loss is ln 2 whatever the model does
        raise _fail(where, "rejected", "the same as 'chosen'; a pair with no preference teaches nothing")


FORMATS: dict[str, Callable[[dict, str], None]] = {
    "messages": _validate_messages,
    "prompt_completion": _validate_prompt_completion,
    "text": _validate_text,
    "preference": _validate_preference,
    "prompt": _check_prompt,
}
# Checked in this order; the first whose keys a row has names the format.
FORMAT_KEYS = [("preference", {"chosen", "rejected"}), ("messages", {"messages"}),
               ("prompt_completion", {"prompt", "completion"}), ("text", {"text"}),
               ("prompt", {"prompt"})]


def detect_format(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    for name, keys in FORMAT_KEYS:
        if keys <= row.keys():
            return name
    raise DataError(f"{where}: cannot tell the format from fields {sorted(row)}; expected one of "
                    "messages | prompt+completion | text | prompt+chosen+rejected | prompt")


def validate_rows(rows: list[dict], fmt: str, source: str, allowed: tuple[str, ...]) -> str:
    """Check every row; returns the format (detected from row 1 when ``fmt`` is auto)."""
    if fmt == "auto":
        fmt = detect_format(rows[0], f"{source}, row 1")
    if fmt not in allowed:
        raise DataError(f"{source}: format {fmt!r} does not fit this stage; it takes {', '.join(allowed)}")
    check = FORMATS[fmt]
    for i, row in enumerate(rows, 1):
        where = f"{source}, row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
        check(row, where)
    return fmt


# -- lengths -------------------------------------------------------------------------------

def row_length(row: dict, fmt: str, tokenizer) -> tuple[int, str]:
    """Token count of a row as training sees it, and the field that makes it long."""
    from adapterkit.tokens import render_ids  # torch: imported once a tokenizer is in play
    if fmt == "messages":
        return len(render_ids(tokenizer, row["messages"])), "messages"
    if fmt == "text":
        return len(render_ids(tokenizer, row["text"])), "text"
    prompt = row.get("prompt")
    n_prompt = len(render_ids(tokenizer, prompt, add_generation_prompt=True)) if prompt else 0
    if fmt == "prompt":
        return n_prompt, "prompt"
    keys = ("completion",) if fmt == "prompt_completion" else ("chosen", "rejected")
    longest = max(keys, key=lambda k: len(render_ids(tokenizer, row[k])))
    return n_prompt + len(render_ids(tokenizer, row[longest])) + 1, longest


def apply_length_policy(rows: list[dict], fmt: str, tokenizer, max_length: int, on_long: str,
                        source: str) -> tuple[list[dict], dict]:
    """``error`` refuses long rows; ``truncate`` keeps them for the trainer to cut; ``drop`` drops."""
    long_rows = []
    for i, row in enumerate(rows, 1):
        n, field_ = row_length(row, fmt, tokenizer)
        if n > max_length:
            long_rows.append((i, field_, n))
    report = {"long_rows": len(long_rows), "truncated": 0, "dropped": 0}
    if long_rows and on_long == "error":
        i, field_, n = long_rows[0]
        more = f" ({len(long_rows) - 1} more rows are too long)" if len(long_rows) > 1 else ""
        raise DataError(f"{source}, row {i}, field '{field_}': {n} tokens, longer than "
                        f"data.max_length={max_length}{more}. Set data.on_long=truncate or drop "
                        "to accept it.")
    if on_long == "drop":
        drop = {i for i, _, _ in long_rows}
        rows = [r for i, r in enumerate(rows, 1) if i not in drop]
        report["dropped"] = len(drop)
        if not rows:
            raise DataError(f"{source}: every row is longer than data.max_length={max_length}")
    elif on_long == "truncate":
        report["truncated"] = len(long_rows)
    return rows, report


def load_data(source: str, *, fmt: str, allowed: tuple[str, ...], tokenizer=None,
              max_length: int | None = None, on_long: str = "error",
              hub_split: str = "train") -> LoadedData:
    """Read, validate every row, and apply the length policy."""
    rows = read_rows(source, hub_split)
    fmt = validate_rows(rows, fmt, source, allowed)
    report = {}
    if tokenizer is not None:
        check_template(tokenizer, rows, source)
    if tokenizer is not None and max_length is not None:
        rows, report = apply_length_policy(rows, fmt, tokenizer, max_length, on_long, source)
    return LoadedData(rows=rows, format=fmt, source=source, report=report)


# -- the chat-template contract --------------------------------------------------------------

def use_chat_template(tokenizer, template: str | None) -> None:
    """Set ``data.chat_template`` (Jinja text, or a file holding it) on the tokenizer."""
    if not template:
        return
    path = Path(template).expanduser()
    if "{" not in template and path.is_file():
        template = path.read_text(encoding="utf-8")
    elif "{" not in template:
        raise DataError(f"data.chat_template {template!r}: neither a Jinja template nor a file")
    tokenizer.chat_template = template


def needs_template(rows: list[dict]) -> bool:
    """True when any row holds a conversation (a list of messages) somewhere."""
    return any(isinstance(v, list) for r in rows for v in r.values())


def check_template(tokenizer, rows: list[dict], source: str) -> None:
    """Conversations need a chat template to become tokens; say so, naming the fix."""
    if needs_template(rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the rows are conversations, but the base's tokenizer has no chat "
                        "template; set data.chat_template to a Jinja template (or a file holding one)")


def template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


def has_generation_markers(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "{% generation %}" in str(template) or "{%- generation %}" in str(template)


def split_last_turn(rows: list[dict]) -> list[dict]:
    """``messages`` -> conversational prompt/completion, so that the loss falls on the last
    assistant turn when the template has no ``{% generation %}`` markers."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def check_chat_contract(tokenizer, source: str = "tokenizer") -> None:
    """The pad token exists and is not EOS; a template renders an assistant turn that
    ends with a token the model can learn to stop on."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise DataError(f"{source}: the pad token must exist and differ from the EOS token "
                        f"(pad={tokenizer.pad_token!r}, eos={tokenizer.eos_token!r}); otherwise "
                        "EOS is masked out as padding and the model never learns to stop")
