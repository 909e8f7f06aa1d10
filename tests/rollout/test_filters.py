"""Filters as data: each rule's decision, first-rule-wins bookkeeping, counts and config errors."""

import pytest

from opd.errors import OpdError
from opd.rollout.filters import RULES, RolloutView, build_filters

EOS = 2


def view(completion="12", tokens=None, truncated=False, correct=None, teacher=None, prompt="p", transcript=None):
    """A view whose tokens are one per character (+ EOS unless truncated), like a char tokenizer."""
    if tokens is None:
        tokens = [ord(c) for c in completion] + ([] if truncated else [EOS])
    return RolloutView(prompt=prompt, completion=completion, token_ids=tokens, truncated=truncated,
                       correct=correct, teacher_logprobs=teacher, transcript=transcript)


def episode(*calls, answer="5"):
    """An episode's messages: each call answered by a tool, then the final answer."""
    turns = [{"role": "user", "content": "q"}]
    for call in calls:
        turns += [{"role": "assistant", "content": call}, {"role": "tool", "content": "1"}]
    return turns + [{"role": "assistant", "content": answer}]


CASES = [
    ({"rule": "min_tokens", "n": 2}, view("12"), True),
    ({"rule": "min_tokens", "n": 2}, view("1"), False),  # the EOS does not count
    ({"rule": "min_tokens", "n": 1}, view(""), False),
    ({"rule": "max_tokens", "n": 3}, view("123"), True),
    ({"rule": "max_tokens", "n": 3}, view("1234"), False),
    ({"rule": "max_tokens", "n": 64}, view("12", truncated=True), False),  # no EOS: truncated
    ({"rule": "regex", "pattern": "^[0-9]+$"}, view("42"), True),
    ({"rule": "regex", "pattern": "^[0-9]+$", "must_match": True}, view("4a2"), False),
    ({"rule": "regex", "pattern": "a", "must_match": False}, view("42"), True),
    ({"rule": "regex", "pattern": "a", "must_match": False}, view("4a2"), False),
    ({"rule": "repetition", "n": 2, "max_repeats": 2}, view("ababa"), True),  # "ab" twice
    ({"rule": "repetition", "n": 2, "max_repeats": 2}, view("abababa"), False),  # "ab" three times
    ({"rule": "repetition", "n": 1, "max_repeats": 3}, view("aaa"), True),
    ({"rule": "repetition", "n": 1, "max_repeats": 3}, view("aaaa"), False),
    ({"rule": "repetition", "n": 5, "max_repeats": 1}, view("ab"), True),  # shorter than n
    ({"rule": "verifier", "keep": "passing"}, view(correct=True), True),
    ({"rule": "verifier", "keep": "passing"}, view(correct=False), False),
    ({"rule": "verifier", "keep": "passing"}, view(correct=None), False),
    ({"rule": "verifier", "keep": "failing"}, view(correct=False), True),
    ({"rule": "verifier", "keep": "failing"}, view(correct=True), False),
    ({"rule": "teacher_logprob_min", "value": -3.0}, view(teacher=[-1.0, -4.0, -2.0]), True),  # mean -2.33
    ({"rule": "teacher_logprob_min", "value": -2}, view(teacher=[-1.0, -4.0, -2.0]), False),
    ({"rule": "teacher_logprob_min", "value": -1.0}, view(teacher=None), True),
    ({"rule": "max_tool_calls", "max": 1}, view(transcript=episode("CALL 1+2")), True),
    ({"rule": "max_tool_calls", "max": 1}, view(transcript=episode("CALL 1+2", "CALL 1+2")), False),
    ({"rule": "max_tool_calls", "max": 0}, view(), True),  # a single completion has no calls
    ({"rule": "tool_call_format", "pattern": r"CALL [0-9+*-]+"}, view(transcript=episode("CALL 1+2")), True),
    ({"rule": "tool_call_format", "pattern": r"CALL [0-9+*-]+"}, view(transcript=episode("CALL 1+2", "CALL x")),
     False),
    ({"rule": "tool_call_format", "pattern": r"CALL [0-9+*-]+"}, view(transcript=episode(answer="CALL x")), True),
]


@pytest.mark.parametrize("spec,v,kept", CASES, ids=[f"{c[0]['rule']}-{i}" for i, c in enumerate(CASES)])
def test_rule_keeps_or_rejects(spec, v, kept):
    chain = build_filters([spec])
    assert chain.apply([v]) == [None if kept else spec["rule"]]


def test_every_rule_is_tested():
    assert {c[0]["rule"] for c in CASES} | {"dedupe"} == set(RULES)


def test_dedupe_rejects_repeats_within_a_batch_and_resets_between_batches():
    chain = build_filters([{"rule": "dedupe"}])
    batch = [view("1", prompt="a"), view("1", prompt="a"), view("1", prompt="b"), view("2", prompt="a")]
    assert chain.apply(batch) == [None, "dedupe", None, None]
    assert chain.apply(batch) == [None, "dedupe", None, None]  # state reset at each apply


def test_dedupe_only_remembers_rollouts_the_whole_chain_kept():
    chain = build_filters([{"rule": "dedupe"}, {"rule": "verifier", "keep": "passing"}])
    batch = [view("1", correct=False), view("1", correct=True), view("1", correct=True)]
    assert chain.apply(batch) == ["verifier", None, "dedupe"]


def test_first_rule_wins_and_counts():
    chain = build_filters([{"rule": "max_tokens", "n": 3}, {"rule": "regex", "pattern": "^[0-9]+$"},
                           {"rule": "dedupe"}, {"rule": "min_tokens", "n": 1}])
    views = [view("12345"), view("12a4"), view("1a"), view("12"), view("12"), view("7")]
    reasons = chain.apply(views)
    assert reasons == ["max_tokens", "max_tokens", "regex", None, "dedupe", None]
    assert chain.reject_counts(reasons) == {"max_tokens": 2, "regex": 1, "dedupe": 1, "min_tokens": 0}


def test_repeated_rules_get_distinct_names_and_describe():
    chain = build_filters([{"rule": "regex", "pattern": "^1|^$"},
                           {"rule": "regex", "pattern": "9$", "must_match": False},
                           {"rule": "min_tokens", "n": 1, "name": "nonempty"}])
    assert [d["name"] for d in chain.describe()] == ["regex", "regex_2", "nonempty"]
    assert chain.describe()[1] == {"rule": "regex", "name": "regex_2", "pattern": "9$", "must_match": False}
    assert chain.apply([view("29"), view("19"), view("")]) == ["regex", "regex_2", "nonempty"]


@pytest.mark.parametrize("specs", [None, []])
def test_empty_chain_keeps_everything(specs):
    chain = build_filters(specs)
    assert chain.apply([view(""), view("x", truncated=True)]) == [None, None]
    assert chain.reject_counts([None, None]) == {} and chain.describe() == []


@pytest.mark.parametrize("specs,message", [
    ([{"rule": "xyz"}], "unknown filter rule 'xyz' (valid: min_tokens, max_tokens"),
    ([{"n": 3}], "filters[0] must be a mapping with a 'rule' key"),
    (["dedupe"], "filters[0] must be a mapping"),
    ({"rule": "dedupe"}, "filters must be a list"),
    ([{"rule": "min_tokens"}], "filter rule 'min_tokens': missing parameter 'n'"),
    ([{"rule": "min_tokens", "n": "2"}], "filter rule 'min_tokens': parameter 'n' must be int"),
    ([{"rule": "min_tokens", "n": True}], "parameter 'n' must be int"),
    ([{"rule": "max_tokens", "n": 0}], "filter rule 'max_tokens': parameter 'n' must be >= 1"),
    ([{"rule": "max_tokens", "n": 4, "m": 1}], "filter rule 'max_tokens': unknown parameter 'm'"),
    ([{"rule": "dedupe", "n": 1}], "filter rule 'dedupe': unknown parameter 'n' (valid: none)"),
    ([{"rule": "regex", "pattern": "("}], "filter rule 'regex': bad regular expression '('"),
    ([{"rule": "regex", "pattern": "a", "must_match": "yes"}], "parameter 'must_match' must be bool"),
    ([{"rule": "repetition", "n": 3}], "filter rule 'repetition': missing parameter 'max_repeats'"),
    ([{"rule": "verifier", "keep": "right"}], "filter rule 'verifier': parameter 'keep' must be passing or failing"),
    ([{"rule": "teacher_logprob_min", "value": "low"}], "parameter 'value' must be int or float"),
    ([{"rule": "dedupe", "name": ""}], "parameter 'name' must be a non-empty string"),
])
def test_config_errors_are_one_line(specs, message):
    with pytest.raises(OpdError) as info:
        build_filters(specs)
    assert message in str(info.value) and "\n" not in str(info.value)
