"""Verifiers built from config specs."""

from __future__ import annotations

import sys
import textwrap

import pytest

from opd.errors import OpdError
from opd.tasks.verifiers import make_verifier, parse_last_number


@pytest.mark.parametrize("completion, answer, expected", [
    ("42", "42", True),
    ("  42\n", " 42 ", True),
    ("4 2", "42", False),
    ("421", "42", False),
    ("", "42", False),
])
def test_exact(completion, answer, expected):
    assert make_verifier("exact")(completion, answer) is expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("the answer is 1,234.0", "1234", True),
    ("-3", "-3.0", True),
    ("first 7 then 12", "12", True),
    ("first 12 then 7", "12", False),
    ("1234.", "1234", True),
    ("x = 1000000.0000001", "1000000", True),  # within relative 1e-6
    ("1.01", "1", False),
    ("no number here", "5", False),
    ("5", "five", False),
    ("0", "0", True),
    ("0.001", "0", False),
    ("12,345,678", "12345678", True),
])
def test_numeric(completion, answer, expected):
    assert make_verifier("numeric")(completion, answer) is expected


def test_parse_last_number():
    assert parse_last_number("a -2.5 b .5") == 0.5
    assert parse_last_number("total: -1,000") == -1000
    assert parse_last_number("none") is None


def test_regex_without_answer_group():
    v = make_verifier(r"regex:\d+:\d+")
    assert v(" 12:34 ", "ignored") is True
    assert v("12:34x", "ignored") is False  # fullmatch, not search


def test_regex_with_answer_group():
    v = make_verifier(r"regex:.*answer is (?P<answer>-?\d+)\.?")
    assert v("so the answer is 42.", "42") is True
    assert v("so the answer is 41.", "42") is False
    assert v("42", "42") is False


def test_verifier_keeps_spec():
    for spec in ("exact", "numeric", "regex:a+"):
        assert make_verifier(spec).spec == spec


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A verifier module in a fresh cwd that is not on sys.path."""
    name = f"my_checks_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        LIMIT = 3
        def check(completion, answer):
            return completion.lower() == answer.lower()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_python_verifier(user_module):
    v = make_verifier(f"python:{user_module}:check")
    assert v.spec == f"python:{user_module}:check"
    assert v("ABC", "abc") is True
    assert v("abd", "abc") is False


@pytest.mark.parametrize("suffix, message", [
    ("no_such_module_xyz:check", "cannot import module 'no_such_module_xyz'"),
    ("{mod}:nope", "has no attribute 'nope'"),
    ("{mod}:LIMIT", "is not callable"),
    ("{mod}", "must look like python:module:function"),
])
def test_python_verifier_errors(user_module, suffix, message):
    with pytest.raises(OpdError, match=message):
        make_verifier("python:" + suffix.format(mod=user_module))


@pytest.mark.parametrize("spec, message", [
    ("exactly", "unknown verifier 'exactly'; valid kinds: exact, numeric, regex:<pattern>"),
    ("", "unknown verifier"),
    ("regex:(unclosed", "bad regular expression"),
    ("regex:", "needs a pattern"),
])
def test_bad_specs(spec, message):
    with pytest.raises(OpdError, match=message.replace("(", r"\(")):
        make_verifier(spec)
