"""The cross-tokenizer teacher (opd/teachers/cross.py): its scores feed the unchanged sampled estimator.

- identical tokenizers: loss and gradient equal the same-tokenizer sampled estimator (rel 1e-6);
- different tokenizers: loss and gradient equal a float64 reference of the span-level estimator, rows
  cut at an unreadable token included (that token penalised, the rest unscored);
- loading, routing, cut counts, metrics, the teacher's own answers, the manifest entry.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from opd.backends.hf import init_model, load_model
from opd.config import ObjectiveConfig, TrainConfig
from opd.errors import OpdError
from opd.methods import MethodOptions, make_method
from opd.objectives.sampled import sampled_token_advantage
from opd.objectives.select import make_objective, token_logprobs
from opd.rollout.prompts import encode_prompts
from opd.batch import Batch
from opd.rollout.sampler import completion_logits, decode_completions, generate
from opd.tasks.data import Example
from opd.tasks.schema import PromptSchema
from opd.teachers.align import UNALIGNED_SPECIAL, Aligned
from opd.teachers.cross import CrossTokenizerTeacher, alignment_metrics, check_cross_config
from opd.teachers.local import LocalTeacher
from opd.teachers.pool import TeacherPool
from opd.train.step import update
from opd.world import World

TEXTS = ["12+34=64", "7+5=21", "99+1=001", "héllo"] * 8
SCHEMA = PromptSchema.from_spec("{prompt}")
EXAMPLES = [Example("12+34=", "64"), Example("7+5=", "21"), Example("99+1=", "001"), Example("3+4=", "7")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    paths = {}
    for name, tok, seed in (("char_a", "char", 0), ("char_b", "char", 1), ("bpe", "bpe", 2)):
        paths[name] = init_model("qwen3", layers=1, hidden=32, heads=2, tokenizer_texts=TEXTS, out=root / name,
                                 seed=seed, tokenizer=tok, vocab_size=280 if tok == "bpe" else None)
    return paths


def sample(student, n_new=6, seed=0):
    tok = student.tokenizer
    prompts = encode_prompts(EXAMPLES, SCHEMA, tok)
    return generate(student.model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=n_new,
                    generator=torch.Generator().manual_seed(seed))


def written(tok, texts, ended=(True, False, True, True)):
    """A batch of these completion texts (each + EOS where `ended`) after the examples' prompts."""
    from opd.batch import left_pad
    from opd.teachers.cross import right_pad

    rows = [tok(t, add_special_tokens=False).input_ids + ([tok.eos_token_id] if e else []) for t, e in zip(texts, ended)]
    ids, mask = right_pad(rows, tok.pad_token_id)
    return Batch(*left_pad(encode_prompts(EXAMPLES, SCHEMA, tok), tok.pad_token_id), ids, mask,
                 torch.zeros(ids.shape), torch.tensor([not e for e in ended]))


def on_policy(model, batch):
    """The batch with the current student's own log-probs as its sampling log-probs (temperature 1)."""
    with torch.no_grad():
        batch.sample_logprobs = token_logprobs(completion_logits(model, batch), batch.completion_ids) \
            * batch.completion_mask
    return batch


def cross(teacher_dir, student_tok):
    return CrossTokenizerTeacher(LocalTeacher("teacher", str(teacher_dir), dtype="float32"), student_tok, SCHEMA)


def one_update(student_model, teacher, batch):
    """The loss and the gradient of one opd update with the sampled estimator (clip 1), SGD lr 1."""
    model = copy.deepcopy(student_model).requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scores, _ = TeacherPool([teacher], SCHEMA, None).score(batch, EXAMPLES)
    before = [p.detach().clone() for p in model.parameters()]
    stats = update(model, opt, sched, make_method(MethodOptions()), make_objective(
        ObjectiveConfig(name="sampled_reverse_kl", clip=1.0)), batch, TrainConfig(precision="float32", grad_clip=0),
        scores=scores)
    return stats["loss"], torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])


def test_identical_tokenizers_give_the_same_loss_and_gradient(models):
    student = load_model(str(models["char_a"]))
    batch = sample(student)
    special = torch.isin(batch.completion_ids, torch.tensor(student.tokenizer.all_special_ids))
    ends = batch.completion_ids == student.tokenizer.eos_token_id
    batch.completion_ids[special & ~ends] = student.tokenizer.convert_tokens_to_ids("7")  # no specials mid-text
    local = LocalTeacher("teacher", str(models["char_b"]), dtype="float32", student_schema=SCHEMA)
    wrapped = cross(models["char_b"], student.tokenizer)
    aligned = wrapped.align(batch)
    assert all(isinstance(r, Aligned) for r in aligned)
    assert all(r.stats()["one_to_one"] == r.stats()["spans"] for r in aligned)  # every span one token
    loss_a, grad_a = one_update(student.model, local, batch)
    loss_b, grad_b = one_update(student.model, wrapped, batch)
    assert grad_a.abs().max() > 0
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-6, atol=1e-6 * float(grad_a.abs().max()))


def reference(student_model, teacher, batch, rows, clip=1.0):
    """Float64 loss and gradient of the span estimator, each side scored on its own tokens:
    -(sum_spans clip(lpT(span) - lpS(span)) lpS(span) + sum_cut max(-penalty, -clip) lpS(cut token)) / N,
    lpT(span) = log Q(text to its end) - log Q(text before it), Q(x) = the teacher's probability that the
    text starts with x: its tokens before the last one of x, then any token whose text starts with that one's."""
    model64 = copy.deepcopy(student_model).double().requires_grad_(True)
    s_lp = token_logprobs(completion_logits(model64, batch).double(), batch.completion_ids)
    t_model = copy.deepcopy(teacher.model).double()
    t_tok, loss, n = teacher.tokenizer, 0.0, batch.completion_mask.sum()
    texts = {i: t_tok.decode([i]) for i in range(len(t_tok)) if i not in t_tok.all_special_ids}
    for i, r in enumerate(rows):
        t_ids = torch.tensor([encode_prompts([EXAMPLES[i]], SCHEMA, t_tok)[0] + r.teacher_ids])
        t_logits = t_model(input_ids=t_ids).logits[0, t_ids.shape[1] - len(r.teacher_ids) - 1:-1]
        t_logp = torch.log_softmax(t_logits.double(), -1)
        t_lp = t_logp.gather(-1, torch.tensor(r.teacher_ids, dtype=torch.long)[:, None])[:, 0]

        def log_q(k):  # text up to the end of teacher token k - 1
            if k == 0:
                return 0.0
            last = r.teacher_ids[k - 1]
            ext = [v for v, x in texts.items() if last in texts and x.startswith(texts[last])] or [last]
            return t_lp[:k - 1].sum() + torch.logsumexp(t_logp[k - 1, ext], 0)
        for (a, b), (c, d) in r.spans:
            span = log_q(d) - log_q(c)
            adv = sampled_token_advantage(s_lp[i, a:b].sum()[None, None], span[None, None], clip=clip)
            loss = loss - adv * s_lp[i, a:b].sum()
        if r.cut is not None and r.penalised:  # the first unreadable token; the tokens after it: advantage 0
            loss = loss - max(-teacher.penalty, -clip) * s_lp[i, r.cut]
    loss = loss / n
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in model64.parameters()])


def aligned(models, student_key: str, teacher_key: str, texts: list[str]):
    """A student writing `texts`, a teacher with another tokenizer, and the rows' alignment: every row is
    readable and some spans are longer than one token on a side."""
    student = load_model(str(models[student_key]))
    batch = on_policy(student.model, written(student.tokenizer, texts))
    teacher = cross(models[teacher_key], student.tokenizer)
    rows = teacher.align(batch)
    assert all(r.cut is None for r in rows) and any(r.stats()["one_to_one"] < r.stats()["spans"] for r in rows)
    return student, batch, teacher, rows


def test_other_tokenizers_give_the_span_estimator_of_a_float64_reference(models):
    student, batch, teacher, rows = aligned(models, "bpe", "char_a", ["64", "2", "héllo", "99+1"])
    loss, grad = one_update(student.model, teacher, batch)
    ref, ref_grad = reference(student.model, teacher, batch, rows)
    assert loss == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))


def test_a_bpe_teacher_scores_a_char_students_spans_by_their_text(models):
    student, batch, teacher, rows = aligned(models, "char_a", "bpe", ["64", "21", "001", "99+1"])
    extended = [t for r in rows for t in r.teacher_ids if len(teacher.extensions(t)) > 1]
    assert extended  # some spans end on a token that merges further ("6" -> "64"): their text credit moves
    loss, grad = one_update(student.model, teacher, batch)
    ref, ref_grad = reference(student.model, teacher, batch, rows)
    assert loss == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("penalty", [0.5, 3.0])  # under the clip: -penalty; over it: -clip
def test_a_row_cut_at_an_unreadable_token_is_penalised_there(models, penalty):
    student = load_model(str(models["bpe"]))
    tok = student.tokenizer
    batch = written(tok, ["64", "2", "héllo", "99+1"], ended=(True, True, True, True))
    assert batch.completion_mask[3].sum() > 3
    batch.completion_ids[3, 1] = tok.pad_token_id  # a special token mid-completion, readable text after it
    batch.completion_ids[1, 1] = tok.bos_token_id  # and one in place of the EOS
    batch = on_policy(student.model, batch)
    teacher = cross(models["char_a"], tok)
    teacher.penalty = penalty
    rows = teacher.align(batch)
    assert [(r.cut, r.reason) for r in rows] == [(None, None), (1, UNALIGNED_SPECIAL), (None, None),
                                                 (1, UNALIGNED_SPECIAL)]
    loss, grad = one_update(student.model, teacher, batch)
    ref, ref_grad = reference(student.model, teacher, batch, rows)
    assert loss == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))
    # the tokens after the cut carry no advantage: changing them changes nothing but their own log-probs
    scores, _ = TeacherPool([teacher], SCHEMA, tok).score(batch, EXAMPLES)
    adv = sampled_token_advantage(batch.sample_logprobs, scores.logprobs, clip=1.0) * batch.completion_mask
    assert adv[3, 1] == pytest.approx(-min(penalty, 1.0)) and (adv[3, 2:] == 0).all()


def test_cut_rows_are_counted_by_reason(models):
    student = load_model(str(models["bpe"]))
    tok = student.tokenizer
    batch = written(tok, ["6", "2", "héllo", "001"])
    batch.completion_ids[0, 0] = tok.pad_token_id  # a special token mid-completion
    byte = tok.convert_tokens_to_ids("Ã")  # the first byte of "é"; row 1 is truncated: a cut at the end
    batch.completion_ids[1, 0] = byte
    pool = TeacherPool([cross(models["char_a"], tok)], SCHEMA, tok)
    scores, names = pool.score(batch, EXAMPLES)
    assert names == ["teacher"] * 4 and not hasattr(scores, "rejects")  # no row is dropped
    metrics = alignment_metrics(scores, World())
    assert metrics["align/unaligned"] == 2
    assert metrics["align/penalised_unaligned_special"] == 1 and metrics["align/cut_char_at_end"] == 1
    assert metrics["align/penalised_unaligned_bytes"] == metrics["align/penalised_unaligned_text"] == 0
    assert 0 <= metrics["align/one_to_one"] <= 1 and metrics["align/teacher_span_len"] >= 1
    assert alignment_metrics(SimpleNamespace(), World()) == {}


def test_the_teachers_answers_come_back_in_the_students_tokens(models):
    student = load_model(str(models["bpe"]))
    teacher = cross(models["char_a"], student.tokenizer)
    prompts = encode_prompts(EXAMPLES, SCHEMA, student.tokenizer)
    out = teacher.generate(prompts, EXAMPLES, max_new_tokens=5, greedy=True)
    own = teacher.inner.generate(teacher.prompts(EXAMPLES), EXAMPLES, max_new_tokens=5, greedy=True)
    mine = decode_completions(student.tokenizer, out)
    theirs = decode_completions(teacher.tokenizer, own)
    assert [t for t, _ in mine] == [t for t, _ in theirs] and [ok for _, ok in mine] == [ok for _, ok in theirs]
    assert out.prompt_ids.shape[0] == 4 and (out.prompt_ids[:, -1] == prompts[0][-1]).all()


def test_manifest_entry_records_both_tokenizers_and_the_rule(models):
    from opd.backends.hf import tokenizer_sha256

    student = load_model(str(models["bpe"]))
    entry = cross(models["char_a"], student.tokenizer).describe()["cross_tokenizer"]
    assert entry["student_tokenizer_sha256"] == tokenizer_sha256(student.tokenizer)
    assert entry["teacher_tokenizer_sha256"] != entry["student_tokenizer_sha256"]
    assert "spans" in entry["alignment"] and "<eos>" in entry["end"]
    assert UNALIGNED_SPECIAL in entry["unreadable"]["reasons"] and entry["unreadable"]["penalty"] == -1.0


def config(**sections):
    base = {"method": MethodOptions(), "objective": ObjectiveConfig(),
            "rollout": SimpleNamespace(temperature=1.0)}
    return SimpleNamespace(**{**base, **sections})


def test_what_the_span_estimator_cannot_train_is_refused():
    check_cross_config(config(), "t")
    with pytest.raises(OpdError, match="method mixed"):
        check_cross_config(config(method=MethodOptions(name="mixed")), "t")
    with pytest.raises(OpdError, match="objective reverse_kl"):
        check_cross_config(config(objective=ObjectiveConfig(name="reverse_kl")), "t")
    with pytest.raises(OpdError, match="rollout.temperature must be 1"):
        check_cross_config(config(rollout=SimpleNamespace(temperature=0.7)), "t")
