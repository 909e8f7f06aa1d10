"""Rollout filters as data: an ordered list of rules from the config decides which rollouts train.

    filters:
      - {rule: min_tokens, n: 2}
      - {rule: max_tokens, n: 64}
      - {rule: regex, pattern: "^[0-9]+$", must_match: true}
      - {rule: repetition, n: 3, max_repeats: 2}
      - {rule: dedupe}
      - {rule: verifier, keep: passing}
      - {rule: teacher_logprob_min, value: -3.0}

Rules run in order and the first one that rejects a rollout is recorded as its reason, so the
metrics (`reject/<rule>`) and the sample store say exactly why each rollout was dropped. Token
counts exclude the terminating EOS (the last token of a completion that is not truncated), so
`min_tokens: 1` rejects empty answers. A spec may carry `name:` to tell two rules of one kind
apart; otherwise a repeated rule is named `<rule>_2`, `<rule>_3`, ...
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from opd.errors import OpdError
from opd.rollout.episodes import episode_stats


@dataclass
class RolloutView:
    """What a rule sees of one rollout."""

    prompt: str
    completion: str  # decoded text up to (not including) EOS
    token_ids: list[int]  # completion tokens, including the EOS when there is one
    truncated: bool = False  # no EOS within max_new_tokens
    correct: bool | None = None  # verifier result, None when not verified
    teacher_logprobs: list[float] | None = None  # per completion token
    transcript: list[dict] | None = None  # an episode's messages (multi-turn tasks), else None

    def content_length(self) -> int:
        """Completion tokens not counting the final EOS."""
        return len(self.token_ids) - (0 if self.truncated or not self.token_ids else 1)


@dataclass
class Rule:
    """Base rule: `keeps(view)` decides; stateful rules also use `reset` and `on_kept`."""

    name: str = field(default="", kw_only=True)
    rule: ClassVar[str] = ""
    params: ClassVar[dict[str, tuple[type, ...]]] = {}  # parameter -> accepted types

    def keeps(self, view: RolloutView) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-batch state (called at the start of every FilterChain.apply)."""

    def on_kept(self, view: RolloutView) -> None:
        """Told about each rollout the whole chain kept."""

    def describe(self) -> dict:
        return {"rule": self.rule, "name": self.name,
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name in self.params}}

    def _require(self, ok: bool, param: str, why: str) -> None:
        if not ok:
            raise OpdError(f"filter rule '{self.rule}': parameter '{param}' {why}")


@dataclass
class MinTokens(Rule):
    n: int
    rule: ClassVar[str] = "min_tokens"
    params: ClassVar = {"n": (int,)}

    def __post_init__(self):
        self._require(self.n >= 0, "n", f"must be >= 0, got {self.n}")

    def keeps(self, view):
        return view.content_length() >= self.n


@dataclass
class MaxTokens(Rule):
    """At most n tokens; a truncated completion (no EOS) is always rejected."""

    n: int
    rule: ClassVar[str] = "max_tokens"
    params: ClassVar = {"n": (int,)}

    def __post_init__(self):
        self._require(self.n >= 1, "n", f"must be >= 1, got {self.n}")

    def keeps(self, view):
        return not view.truncated and view.content_length() <= self.n


@dataclass
class RegexRule(Rule):
    """re.search on the completion text (anchor with ^...$); must_match false inverts it."""

    pattern: str
    must_match: bool = True
    rule: ClassVar[str] = "regex"
    params: ClassVar = {"pattern": (str,), "must_match": (bool,)}

    def __post_init__(self):
        try:
            self._compiled = re.compile(self.pattern)
        except re.error as exc:
            raise OpdError(f"filter rule 'regex': bad regular expression {self.pattern!r} ({exc})") from exc

    def keeps(self, view):
        return (self._compiled.search(view.completion) is not None) == self.must_match


@dataclass
class Repetition(Rule):
    """Reject degenerate loops: some n-gram of tokens occurs more than max_repeats times."""

    n: int
    max_repeats: int
    rule: ClassVar[str] = "repetition"
    params: ClassVar = {"n": (int,), "max_repeats": (int,)}

    def __post_init__(self):
        self._require(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        self._require(self.max_repeats >= 1, "max_repeats", f"must be >= 1, got {self.max_repeats}")

    def keeps(self, view):
        toks = view.token_ids[:view.content_length()]
        grams = Counter(tuple(toks[i:i + self.n]) for i in range(len(toks) - self.n + 1))
        return not grams or max(grams.values()) <= self.max_repeats


@dataclass
class Dedupe(Rule):
    """Reject a rollout whose (prompt, completion) equals one already kept in this batch."""

    rule: ClassVar[str] = "dedupe"

    def __post_init__(self):
        self._seen: set[tuple[str, str]] = set()

    def keeps(self, view):
        return (view.prompt, view.completion) not in self._seen

    def reset(self):
        self._seen.clear()

    def on_kept(self, view):
        self._seen.add((view.prompt, view.completion))


@dataclass
class VerifierRule(Rule):
    """Keep only verified-correct (passing) or only wrong (failing) rollouts; unverified ones are rejected."""

    keep: str
    rule: ClassVar[str] = "verifier"
    params: ClassVar = {"keep": (str,)}

    def __post_init__(self):
        self._require(self.keep in ("passing", "failing"), "keep", f"must be passing or failing, got {self.keep!r}")

    def keeps(self, view):
        return view.correct is not None and view.correct == (self.keep == "passing")


@dataclass
class TeacherLogprobMin(Rule):
    """Reject a rollout whose mean teacher log-prob per token is below value (teacher finds it implausible).

    A view without teacher log-probs is kept: there is nothing to judge.
    """

    value: float
    rule: ClassVar[str] = "teacher_logprob_min"
    params: ClassVar = {"value": (int, float)}

    def keeps(self, view):
        lps = view.teacher_logprobs
        return not lps or sum(lps) / len(lps) >= self.value


@dataclass
class MaxToolCalls(Rule):
    """Episodes: reject one with more than `max` tool calls (assistant turns answered by a tool)."""

    max: int
    rule: ClassVar[str] = "max_tool_calls"
    params: ClassVar = {"max": (int,)}

    def keeps(self, view):
        return view.transcript is None or episode_stats(view.transcript)["tool_calls"] <= self.max


@dataclass
class ToolCallFormat(Rule):
    """Episodes: every tool call (an assistant turn answered by a tool) must fully match `pattern`."""

    pattern: str
    rule: ClassVar[str] = "tool_call_format"
    params: ClassVar = {"pattern": (str,)}

    def __post_init__(self):
        try:
            self._compiled = re.compile(self.pattern)
        except re.error as exc:
            raise OpdError(f"filter rule 'tool_call_format': bad regular expression {self.pattern!r} ({exc})") from exc

    def keeps(self, view):
        messages = view.transcript or []
        calls = [m["content"] for m, nxt in zip(messages, messages[1:])
                 if m.get("role") == "assistant" and nxt.get("role") == "tool"]
        return all(self._compiled.fullmatch(c) for c in calls)


RULES: dict[str, type[Rule]] = {cls.rule: cls for cls in
                                (MinTokens, MaxTokens, RegexRule, Repetition, Dedupe, VerifierRule, TeacherLogprobMin,
                                 MaxToolCalls, ToolCallFormat)}


def _type_ok(value, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not a number here (YAML `n: true` is a mistake)."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def build_rule(spec, index: int = 0) -> Rule:
    """One rule from its config mapping; every problem is a one-line OpdError."""
    if not isinstance(spec, dict) or "rule" not in spec:
        raise OpdError(f"filters[{index}] must be a mapping with a 'rule' key, got {spec!r}")
    name = spec["rule"]
    if name not in RULES:
        raise OpdError(f"unknown filter rule {name!r} (valid: {', '.join(RULES)})")
    cls = RULES[name]
    kwargs = {k: v for k, v in spec.items() if k not in ("rule", "name")}
    for key, value in kwargs.items():
        if key not in cls.params:
            valid = ", ".join(cls.params) or "none"
            raise OpdError(f"filter rule '{name}': unknown parameter '{key}' (valid: {valid})")
        if not _type_ok(value, cls.params[key]):
            want = " or ".join(t.__name__ for t in cls.params[key])
            raise OpdError(f"filter rule '{name}': parameter '{key}' must be {want}, got {value!r}")
    required = [f.name for f in fields(cls) if f.name in cls.params and f.default is MISSING]
    for key in required:
        if key not in kwargs:
            raise OpdError(f"filter rule '{name}': missing parameter '{key}'")
    label = spec.get("name", name)
    if not isinstance(label, str) or not label:
        raise OpdError(f"filter rule '{name}': parameter 'name' must be a non-empty string, got {label!r}")
    return cls(**kwargs, name=label)


class FilterChain:
    """Ordered rules; a rollout is kept only if every rule keeps it."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules

    def apply(self, views: list[RolloutView]) -> list[str | None]:
        """Per rollout, the name of the first rule that rejected it, or None if kept."""
        for rule in self.rules:
            rule.reset()
        reasons = []
        for view in views:
            reason = next((r.name for r in self.rules if not r.keeps(view)), None)
            if reason is None:
                for rule in self.rules:
                    rule.on_kept(view)
            reasons.append(reason)
        return reasons

    def describe(self) -> list[dict]:
        return [rule.describe() for rule in self.rules]

    def reject_counts(self, reasons: list[str | None]) -> dict[str, int]:
        """Rejections per rule name (0 for rules that rejected nothing), for `reject/<rule>` metrics."""
        counts = {rule.name: 0 for rule in self.rules}
        for reason in reasons:
            if reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self.rules)


def build_filters(specs: list[dict] | None) -> FilterChain:
    """The chain for the config's `filters:` list (None or [] keeps everything)."""
    if specs is None:
        return FilterChain([])
    if not isinstance(specs, list):
        raise OpdError(f"filters must be a list of rules, got {specs!r}")
    rules = [build_rule(spec, i) for i, spec in enumerate(specs)]
    seen: Counter[str] = Counter()
    for rule in rules:
        seen[rule.name] += 1
        if seen[rule.name] > 1:
            rule.name = f"{rule.name}_{seen[rule.name]}"
    return FilterChain(rules)
