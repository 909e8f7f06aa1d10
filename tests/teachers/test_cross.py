"""The cross-tokenizer teacher (opd/teachers/cross.py): its scores feed the unchanged sampled estimator.

- identical tokenizers: loss and gradient equal the same-tokenizer sampled estimator (rel 1e-6);
- different tokenizers: the loss equals a float64 reference of the span-level estimator;
- loading, routing, reject reasons, metrics, the teacher's own answers, the manifest entry.
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


def test_other_tokenizers_give_the_span_estimator_of_a_float64_reference(models):
    student = load_model(str(models["bpe"]))
    tok = student.tokenizer
    batch = on_policy(student.model, written(tok, ["64", "2", "héllo", "99+1"]))
    teacher = cross(models["char_a"], tok)
    rows = teacher.align(batch)
    good = torch.tensor([isinstance(r, Aligned) for r in rows])
    assert good.all() and any(r.stats()["one_to_one"] < r.stats()["spans"] for r in rows)
    kept = batch.rows(good)
    loss, _ = one_update(student.model, teacher, kept)
    # reference: -sum_spans clip(lpT(span) - lpS(span)) * lpS(span) / N, float64, teacher scored on its own tokens
    model64 = copy.deepcopy(student.model).double()
    s_lp = token_logprobs(completion_logits(model64, kept).double(), kept.completion_ids)
    t_model = teacher.model.double()
    ref, n = 0.0, int(kept.completion_mask.sum())
    for k, (i, r) in enumerate((i, r) for i, r in enumerate(rows) if isinstance(r, Aligned)):
        t_ids = torch.tensor([encode_prompts([EXAMPLES[i]], SCHEMA, teacher.tokenizer)[0] + r.teacher_ids])
        t_logits = t_model(input_ids=t_ids).logits[0, -len(r.teacher_ids) - 1:-1]
        t_lp = torch.log_softmax(t_logits.double(), -1).gather(-1, torch.tensor(r.teacher_ids)[:, None])[:, 0]
        for (a, b), (c, d) in r.spans:
            adv = sampled_token_advantage(s_lp[k, a:b].sum()[None, None], t_lp[c:d].sum()[None, None], clip=1.0)
            ref -= float(adv) * float(s_lp[k, a:b].sum())
    teacher.model.float()
    assert loss == pytest.approx(ref / n, rel=1e-5)


def test_unaligned_rows_are_named_and_counted(models):
    student = load_model(str(models["bpe"]))
    tok = student.tokenizer
    batch = written(tok, ["6", "2", "héllo", "001"])
    batch.completion_ids[0, 0] = tok.pad_token_id  # a special token mid-completion
    pool = TeacherPool([cross(models["char_a"], tok)], SCHEMA, tok)
    scores, names = pool.score(batch, EXAMPLES)
    assert scores.rejects[0] == UNALIGNED_SPECIAL and names == ["teacher"] * 4
    assert (scores.logprobs[0] == 0).all()
    metrics = alignment_metrics(scores, World())
    assert metrics["align/unaligned"] == sum(r is not None for r in scores.rejects) >= 1
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
    assert "spans" in entry["alignment"] and "<eos>" in entry["end"] and UNALIGNED_SPECIAL in entry["rejects"]


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
