"""JSONL loading/saving: round-trips, extra fields, and one-line file:line errors."""

from __future__ import annotations

import json

import pytest

from opd.errors import OpdError
from opd.tasks.data import Example, load_jsonl, save_jsonl


def write(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    examples = [
        Example("1+1=", "2"),
        Example("héllo", "wörld", tag="greet", extra={"id": 7, "meta": {"k": [1, 2]}}),
    ]
    path = tmp_path / "sub" / "data.jsonl"
    save_jsonl(path, examples)
    assert load_jsonl(path) == examples


def test_extra_fields_tag_and_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl",
                 json.dumps({"prompt": "p", "answer": "a", "tag": "math", "source": "x", "n": 3}),
                 "",
                 "   ",
                 json.dumps({"prompt": "q", "answer": "b"}))
    first, second = load_jsonl(path)
    assert first == Example("p", "a", tag="math", extra={"source": "x", "n": 3})
    assert second.tag == "default" and second.extra == {}


@pytest.mark.parametrize("value, text", [(42, "42"), (-3, "-3"), (2.5, "2.5"), ("007", "007")])
def test_numeric_answers_become_strings(tmp_path, value, text):
    path = write(tmp_path / "d.jsonl", json.dumps({"prompt": "p", "answer": value}))
    assert load_jsonl(path)[0].answer == text


BAD_ROWS = [
    ('{"prompt": "p", "answer": ', ":2: invalid JSON ("),
    ('["p", "a"]', ":2: expected a JSON object, got array"),
    ('{"answer": "a"}', ":2: missing field 'prompt'"),
    ('{"prompt": "p"}', ":2: missing field 'answer'"),
    ('{"prompt": 5, "answer": "a"}', ":2: field 'prompt' must be a string, got number"),
    ('{"prompt": "p", "answer": null}', ":2: field 'answer' must be a string or number, got null"),
    ('{"prompt": "p", "answer": true}', ":2: field 'answer' must be a string or number, got boolean"),
    ('{"prompt": "p", "answer": "a", "tag": 1}', ":2: field 'tag' must be a string"),
]


@pytest.mark.parametrize("bad, expected", BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, bad, expected):
    path = write(tmp_path / "bad.jsonl", '{"prompt": "ok", "answer": "1"}', bad)
    with pytest.raises(OpdError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}{expected}")
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(OpdError, match="data file not found: .*nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(OpdError) as info:
        load_jsonl(path)
    assert str(info.value) == f"{path}: no examples"


def test_save_rejects_extra_clashing_with_core_fields(tmp_path):
    with pytest.raises(OpdError, match="clash"):
        save_jsonl(tmp_path / "x.jsonl", [Example("p", "a", extra={"answer": "b"})])
