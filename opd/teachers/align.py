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
name) instead of spans. `align_readable` then aligns its longest readable prefix and names the first
token the teacher cannot read (opd/teachers/cross.py penalises it): a row is never dropped whole, so
writing unreadable tokens is no escape from the teacher's scores.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, replace

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
    # a row aligned up to its first unreadable token only (align_readable): the spans cover the student's
    # tokens [0, cut); token `cut` is unreadable for `reason` (an UNALIGNED name) and gets the penalty when
    # `penalised` (not for a character cut only because sampling stopped: nothing wrong was written)
    cut: int | None = None
    reason: str | None = None
    penalised: bool = False

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


def align_readable(student_tok, teacher_tok, completion: list[int], *, ended: bool, teacher_end_id: int) -> Aligned:
    """`align`, or for a row that cannot be aligned whole its longest readable prefix: Aligned with `cut` =
    the index of the first student token the teacher cannot read (a special token other than the final
    EOS, a cut multi-byte character, text the teacher cannot write) and `reason` = why the whole row failed."""
    whole = align(student_tok, teacher_tok, completion, ended=ended, teacher_end_id=teacher_end_id)
    if isinstance(whole, Aligned):
        return whole
    body = completion[:-1] if ended else list(completion)
    special = set(student_tok.all_special_ids)
    stop = next((i for i, t in enumerate(body) if t in special), len(body))
    # candidates: prefixes that end on a whole character. Binary search for the longest readable one:
    # a tokenizer that writes a text writes its prefixes, so readability only fails past some point
    # (the empty prefix always aligns; O(log n) alignments instead of n for long rows)
    text = decode(student_tok, body[:stop])
    ends = prefix_ends(student_tok, body[:stop], text)
    cands = [k for k, e in enumerate(ends) if e is not None and REPLACEMENT not in text[:e]]
    best = align(student_tok, teacher_tok, [], ended=False, teacher_end_id=teacher_end_id)
    lo, hi, cut = 1, len(cands) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        found = align(student_tok, teacher_tok, body[:cands[mid]], ended=False, teacher_end_id=teacher_end_id)
        if isinstance(found, Aligned):
            best, cut, lo = found, cands[mid], mid + 1
        else:
            hi = mid - 1
    full = decode(student_tok, body)
    # a truncated row whose only fault is a character cut at its very end (by max_new_tokens): not penalised
    cut_by_stop = whole == UNALIGNED_BYTES and not ended and stop == len(body) and \
        REPLACEMENT not in full.rstrip(REPLACEMENT) and full.rstrip(REPLACEMENT) == best.text
    return replace(best, cut=cut, reason=whole, penalised=not cut_by_stop)


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


class Extensions:
    """For a teacher token, the ordinary tokens whose string starts with its string (itself included).

    Why: a teacher's log-prob of its token "6" is the log-prob of "6 not continued by a merge such as
    61", not of the text "6". Summing the probabilities of every token that starts with "6" gives the
    teacher's probability that the text continues with "6" (its canonical tokenizations), which is what
    a span's score should credit (`marginal_logprobs`). Token strings as the vocabulary spells them
    (byte-level BPE's mapped bytes, SentencePiece's pieces), so a prefix there is a prefix of the text."""

    BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # one byte, spelt with "<": no string prefix relation

    def __init__(self, tokenizer):
        special = set(tokenizer.all_special_ids)
        pairs = sorted((s, i) for s, i in tokenizer.get_vocab().items()
                       if i not in special and not self.BYTE_FALLBACK.fullmatch(s))
        self.strings, self.ids = [s for s, _ in pairs], [i for _, i in pairs]
        self.spelling = {i: s for s, i in pairs}
        self.cache: dict[int, list[int]] = {}

    def __call__(self, token: int) -> list[int]:
        if token not in self.cache:
            s = self.spelling.get(token)
            if s is None:
                self.cache[token] = [token]
            else:  # sorted strings: those that start with s are one run from s on
                lo = bisect_left(self.strings, s)
                hi = lo
                while hi < len(self.strings) and self.strings[hi].startswith(s):
                    hi += 1
                self.cache[token] = self.ids[lo:hi]
        return self.cache[token]


def marginal_logprobs(teacher_logprobs: list[float], extension_logprobs: list[float], spans) -> list[float]:
    """The teacher's token log-probs moved so that each span's sum is the log-prob of the span's TEXT
    given the text before it. With Q(x) = the teacher's probability that the text starts with x:

        span s (teacher tokens j..k):  log Q(text to s's end) - log Q(text to the previous span's end)
          = lp[j] + ... + lp[k-1] + lpx[k] - (lpx - lp)[previous span's last token]

    where lpx[k] = log sum_{v starts with token k} p_T(v) (the extensions, `Extensions`). Without it a
    span "6" would be scored as "6, and no merge like 61 follows", and the next span would get that
    credit. The sums over a whole row are unchanged (telescoping; the EOS has no extensions)."""
    out = list(teacher_logprobs)
    carry = 0.0
    for _, (lo, hi) in spans:
        if hi == lo:
            continue
        out[lo] -= carry
        carry = extension_logprobs[hi - 1] - teacher_logprobs[hi - 1]
        out[hi - 1] += carry
    return out


def row_scores(sample_logprobs: list[float], teacher_logprobs: list[float], row: Aligned,
               penalty: float) -> list[float]:
    """`span_scores` for every student token of one row (len(sample_logprobs) = its tokens). Past a cut
    (align_readable), the first unreadable token reads as advantage -penalty (the estimator clips it to
    -clip at most) and the tokens after it as advantage 0 (lpS itself): nothing scores them."""
    if row.cut is None:
        return span_scores(sample_logprobs, teacher_logprobs, row.spans)
    out = span_scores(sample_logprobs[:row.cut], teacher_logprobs, row.spans) + list(sample_logprobs[row.cut:])
    if row.penalised:
        out[row.cut] -= penalty
    return out
