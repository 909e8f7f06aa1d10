"""Task examples and their JSONL form.

A row is `{"prompt": str, "answer": str, ...}` (for `opd sft` also `{"messages": [...]}`, a
Transcript). Bad rows fail loudly with `PATH:LINE:` so a user can fix the file; unknown fields are
kept verbatim in `Example.extra` (prompt templates may use them, and `save_jsonl` writes them back,
so files round-trip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from opd.errors import OpdError

CORE_FIELDS = ("prompt", "answer", "tag")
DEFAULT_TAG = "default"


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; `tag` routes it (task mixing, multi-teacher)."""

    prompt: str
    answer: str
    tag: str = DEFAULT_TAG
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Transcript:
    """A whole chat episode, `[{"role", "content"}, ...]` with at least one assistant message: an SFT
    row (`{"messages": [...]}`) trained on its assistant turns only (opd/train/sft.py)."""

    messages: list
    tag: str = DEFAULT_TAG


def load_jsonl(path) -> list[Example]:
    """Read examples from a JSONL file; every problem is an OpdError naming the file and line."""
    return _load(path, _parse_line)


def load_sft_rows(path) -> list:
    """`opd sft` data: rows `{"prompt", "answer"}` (Example) or `{"messages": [...]}` (Transcript), mixed freely."""
    return _load(path, lambda p, i, line: _parse_line(p, i, line, transcripts=True))


def _load(path, parse) -> list:
    p = Path(path)
    if not p.is_file():
        raise OpdError(f"data file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise OpdError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    examples = [parse(p, i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    if not examples:
        raise OpdError(f"{p}: no examples")
    return examples


def _parse_line(path: Path, lineno: int, line: str, transcripts: bool = False):
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OpdError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(row, dict):
        raise OpdError(f"{where}: expected a JSON object, got {_json_type(row)}")
    if transcripts and "messages" in row:
        return _transcript(row, where)
    for name in ("prompt", "answer"):
        if name not in row:
            raise OpdError(f"{where}: missing field '{name}'")
    if not isinstance(row["prompt"], str):
        raise OpdError(f"{where}: field 'prompt' must be a string, got {_json_type(row['prompt'])}")
    tag = row.get("tag", DEFAULT_TAG)
    if not isinstance(tag, str):
        raise OpdError(f"{where}: field 'tag' must be a string, got {_json_type(tag)}")
    answer = _answer_text(row["answer"], where)
    extra = {k: v for k, v in row.items() if k not in CORE_FIELDS}
    return Example(prompt=row["prompt"], answer=answer, tag=tag, extra=extra)


def _transcript(row: dict, where: str) -> Transcript:
    messages = row["messages"]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise OpdError(f"{where}: field 'messages' must be a list of {{\"role\": str, \"content\": str}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise OpdError(f"{where}: the transcript has no assistant message to train on")
    tag = row.get("tag", DEFAULT_TAG)
    if not isinstance(tag, str):
        raise OpdError(f"{where}: field 'tag' must be a string, got {_json_type(tag)}")
    return Transcript(messages=[dict(m) for m in messages], tag=tag)


def save_transcripts(path, transcripts) -> None:
    """Write message lists (or Transcripts) as `{"messages": [...]}` rows, the form `load_sft_rows` reads."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for t in transcripts:
            row = {"messages": t.messages, **({"tag": t.tag} if t.tag != DEFAULT_TAG else {})} \
                if isinstance(t, Transcript) else {"messages": t}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _answer_text(value, where: str) -> str:
    """Answers may be JSON numbers (`"answer": 42`); they become their string form."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise OpdError(f"{where}: field 'answer' must be a string or number, got {_json_type(value)}")


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def save_jsonl(path, examples) -> None:
    """Write examples in the format `load_jsonl` reads (tag omitted when it is the default)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(_row(ex), ensure_ascii=False) + "\n")


def _row(ex: Example) -> dict:
    clash = sorted(set(ex.extra) & set(CORE_FIELDS))
    if clash:
        raise OpdError(f"example extra fields clash with core fields: {', '.join(clash)}")
    row = {"prompt": ex.prompt, "answer": ex.answer}
    if ex.tag != DEFAULT_TAG:
        row["tag"] = ex.tag
    row.update(ex.extra)
    return row
