"""Cross-tokenizer alignment by text (docs/cross_tokenizer.md): pure functions, no model.

The student's completion is decoded to text; the teacher tokenizes the same text with its own
tokenizer. Each side's token boundaries are character positions in that text, found by decoding
every prefix of its tokens: the boundary after i tokens is len(decode(ids[:i])) when that decode is a
prefix of the whole text, and no boundary otherwise (a multi-byte character split over byte tokens
decodes to U+FFFD mid-way). Decoding rather than `offset_mapping` because offsets are trimmed by
some tokenizers (a ByteLevel token " 12" may report only "12"), which hides whose the space is.

Tokens are grouped into the smallest spans whose boundaries coincide on both sides. The student's
final EOS is one span of its own, aligned with the teacher's end token (its EOS, or the end-of-turn
token its chat template writes). A completion that cannot be aligned gets a reason (a reject rule
name) instead of spans, and is filtered, never scored on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

# reject rule names of completions that cannot be aligned (the store's reject_rule, metrics' reject/<name>)
UNALIGNED_SPECIAL = "unaligned_special"  # a special token other than the final EOS: no text to align
UNALIGNED_BYTES = "unaligned_bytes"  # not whole characters (a multi-byte character cut by truncation)
UNALIGNED_TEXT = "unaligned_text"  # the teacher's tokenizer cannot write the text back exactly
UNALIGNED = (UNALIGNED_SPECIAL, UNALIGNED_BYTES, UNALIGNED_TEXT)
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Aligned:
    """One completion aligned: spans[k] = ((s_lo, s_hi), (t_lo, t_hi)), token index ranges into the
    student's completion ids and the teacher's `teacher_ids` (the EOS span last, when it ended)."""

    text: str
    teacher_ids: list[int]
    spans: list[tuple[tuple[int, int], tuple[int, int]]]
    ended: bool  # the completion ends with the student's EOS (its last span is EOS <-> the teacher's end)

    def text_spans(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        return self.spans[:-1] if self.ended else self.spans

    def stats(self) -> dict:
        """Counts over the text spans (the EOS span is always 1:1 and left out)."""
        spans = self.text_spans()
        return {"spans": len(spans), "one_to_one": sum(s[1] - s[0] == 1 and t[1] - t[0] == 1 for s, t in spans),
                "student_tokens": sum(s[1] - s[0] for s, _ in spans),
                "teacher_tokens": sum(t[1] - t[0] for _, t in spans)}


def decode(tokenizer, ids: list[int]) -> str:
    """Text of ids exactly as written: special tokens kept, no clean-up of spaces before punctuation."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prefix_ends(tokenizer, ids: list[int], text: str | None = None) -> list[int | None]:
    """[n + 1] character position after each prefix ids[:i] of ids, None where that prefix's text is not
    a prefix of the whole `text` (default: decode(ids)), so no token boundary falls there."""
    text = decode(tokenizer, ids) if text is None else text
    texts = tokenizer.batch_decode([ids[:i] for i in range(len(ids) + 1)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [len(t) if text.startswith(t) and not t.endswith(REPLACEMENT) or t == text else None for t in texts]


def group_spans(student_ends: list[int | None], teacher_ends: list[int | None]) -> list:
    """The smallest spans whose boundaries coincide: [((s_lo, s_hi), (t_lo, t_hi)), ...] covering every
    token of both sides. Both lists start at position 0 and end at the text's length. A position several
    prefixes reach (zero-width tokens) starts a span at its first prefix; the last span ends after all."""
    assert student_ends[0] == 0 and teacher_ends[0] == 0, "a prefix of no tokens is at position 0"
    assert student_ends[-1] == teacher_ends[-1], f"texts differ in length: {student_ends[-1]} vs {teacher_ends[-1]}"
    firsts = []
    for ends in (student_ends, teacher_ends):
        first = {}
        for i, e in enumerate(ends):
            if e is not None:
                first.setdefault(e, i)
        firsts.append(first)
    common = sorted(set(firsts[0]) & set(firsts[1]))
    s_idx = [firsts[0][c] for c in common[:-1]] + [len(student_ends) - 1]
    t_idx = [firsts[1][c] for c in common[:-1]] + [len(teacher_ends) - 1]
    if len(common) == 1:  # no text: one span of whatever zero-width tokens there are, or none
        s_idx, t_idx = [0] + s_idx, [0] + t_idx
    spans = [((s_idx[k], s_idx[k + 1]), (t_idx[k], t_idx[k + 1])) for k in range(len(s_idx) - 1)]
    return [sp for sp in spans if sp[0][1] > sp[0][0] or sp[1][1] > sp[1][0]]


def align(student_tok, teacher_tok, completion: list[int], *, ended: bool, teacher_end_id: int) -> Aligned | str:
    """Align one student completion (its ids, the final EOS included when `ended`) with the teacher's
    tokens of the same text; returns Aligned, or the reason (an UNALIGNED name) it cannot be aligned."""
    body = completion[:-1] if ended else list(completion)
    special = set(student_tok.all_special_ids)
    if any(t in special for t in body):
        return UNALIGNED_SPECIAL
    text = decode(student_tok, body)
    if REPLACEMENT in text:
        return UNALIGNED_BYTES
    teacher_ids = teacher_tok(text, add_special_tokens=False).input_ids if text else []
    unk = teacher_tok.unk_token_id
    if (unk is not None and unk in teacher_ids) or decode(teacher_tok, teacher_ids) != text:
        return UNALIGNED_TEXT
    spans = group_spans(prefix_ends(student_tok, body, text), prefix_ends(teacher_tok, teacher_ids, text))
    if any(s[1] == s[0] or t[1] == t[0] for s, t in spans):  # tokens with no text on one side only
        return UNALIGNED_TEXT
    if ended:
        spans.append(((len(body), len(body) + 1), (len(teacher_ids), len(teacher_ids) + 1)))
        teacher_ids = teacher_ids + [teacher_end_id]
    return Aligned(text, teacher_ids, spans, ended)


def span_sums(values: list[float], spans, side: int) -> list[float]:
    """Sum of `values` (one per token of one side) over each span; side 0 = student, 1 = teacher."""
    return [sum(values[lo:hi]) for lo, hi in (sp[side] for sp in spans)]


def span_scores(sample_logprobs: list[float], teacher_logprobs: list[float], spans) -> list[float]:
    """Per student token of one aligned row, what the sampled reverse-KL estimator reads as the teacher's
    log-prob, so that its advantage on every token of a span is the span's:

        student token t of span s:   lpS[t] + (lpT(s) - lpS(s))       (lp(s): the sum over its tokens)

    on-policy at temperature 1 (the current student = the sampler), lpT'[t] - lpS[t] = lpT(s) - lpS(s).
    A span of one student token gets lpT(s) itself: exact, whatever policy sampled it (1:1 spans are
    the same-tokenizer estimator, bit for bit). Sums in float64 (Python floats)."""
    out = [0.0] * len(sample_logprobs)
    for (s_lo, s_hi), (t_lo, t_hi) in spans:
        teacher = sum(teacher_logprobs[t_lo:t_hi])
        if s_hi - s_lo == 1:
            out[s_lo] = teacher
            continue
        advantage = teacher - sum(sample_logprobs[s_lo:s_hi])
        for t in range(s_lo, s_hi):
            out[t] = sample_logprobs[t] + advantage
    return out
