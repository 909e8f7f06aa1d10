"""Verifiers: decide whether a student's completion answers an example correctly.

A verifier is called as `verifier(completion_text, answer)` with the decoded completion up to
(not including) EOS. `make_verifier(spec)` builds one from a config string; the result keeps the
string in `.spec` so a run manifest can record exactly how answers were judged.

Specs:
  exact                   completion.strip() == answer.strip()
  numeric                 last number in the completion == the answer (relative tolerance 1e-6;
                          commas as thousands separators allowed, e.g. "1,234.5")
  regex:<pattern>         re.fullmatch(pattern, completion.strip()); if the pattern has a named
                          group `answer`, that group (stripped) must also equal answer.strip()
  python:module:function  function(completion, answer) -> bool from an importable module
                          (the current working directory is importable)
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from opd.errors import OpdError

Verifier = Callable[[str, str], bool]

VALID_KINDS = ("exact", "numeric", "regex:<pattern>", "python:module:function")

# Comma-grouped numbers first ("1,234.5"), then plain ("-12", "3.25", ".5").
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
REL_TOL = 1e-6
ABS_TOL = 1e-12  # so an answer of 0 matches only (numerically) 0


@dataclass(frozen=True)
class SpecVerifier:
    """A verifier function plus the spec string it was built from (for manifests)."""

    spec: str
    fn: Callable[[str, str], bool]

    def __call__(self, completion: str, answer: str) -> bool:
        return bool(self.fn(completion, answer))


def make_verifier(spec: str) -> SpecVerifier:
    """Build the verifier named by `spec`; an unusable spec is an OpdError."""
    if not isinstance(spec, str):
        raise OpdError(f"verifier spec must be a string, got {spec!r}")
    if spec == "exact":
        return SpecVerifier(spec, exact_match)
    if spec == "numeric":
        return SpecVerifier(spec, numeric_match)
    if spec.startswith("regex:"):
        return SpecVerifier(spec, _regex_verifier(spec[len("regex:"):]))
    if spec.startswith("python:"):
        return SpecVerifier(spec, _python_verifier(spec))
    raise OpdError(f"unknown verifier {spec!r}; valid kinds: {', '.join(VALID_KINDS)}")


def one_line(exc: BaseException) -> str:
    """An exception's message with newlines collapsed (OpdError messages print as one line)."""
    return " ".join(str(exc).split())


def exact_match(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def parse_last_number(text: str) -> float | None:
    """The last number written in `text` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(completion: str, answer: str) -> bool:
    got, want = parse_last_number(completion), parse_last_number(answer)
    if got is None or want is None:
        return False
    return math.isclose(got, want, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _regex_verifier(pattern: str) -> Callable[[str, str], bool]:
    if not pattern:
        raise OpdError("verifier 'regex:' needs a pattern after the colon")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise OpdError(f"verifier 'regex:{pattern}': bad regular expression ({exc})") from exc
    has_answer = "answer" in compiled.groupindex

    def check(completion: str, answer: str) -> bool:
        m = compiled.fullmatch(completion.strip())
        if m is None:
            return False
        if not has_answer:
            return True
        group = m.group("answer")
        return group is not None and group.strip() == answer.strip()

    return check


def _python_verifier(spec: str) -> Callable[[str, str], bool]:
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise OpdError(f"verifier {spec!r} must look like python:module:function")
    _, module_name, attr = parts
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is a user-facing error
        raise OpdError(f"verifier {spec!r}: cannot import module '{module_name}' "
                       f"({type(exc).__name__}: {one_line(exc)})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise OpdError(f"verifier {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise OpdError(f"verifier {spec!r}: '{module_name}.{attr}' is not callable")
    return fn
