"""Preflight: cheap checks before step 1 for the mistakes that otherwise cost days (docs/preflight.md).

    prompts    a few prompts as the student and each teacher read them (token ids decoded, special
               tokens shown), with a student sample and the teacher's greedy answer for each
    tokens     EOS, PAD and BOS of the student and the teachers; an EOS they disagree on is an error
    log-prob   the teacher's mean log-prob per token on its own greedy answers and on the student's
               samples; implausibly low on the student's (see GAP_NATS) is a warning
    self-test  (opt-in) a throwaway copy of the student distilled into a frozen copy of itself through
               each teacher's input path and opd's update: the reverse KL must stay below SELF_TEST_KL

Samples come from opd's own sampler on the student in this process (whatever rollout.backend is), with
explicit generators: the run's randomness does not depend on whether the preflight ran.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
import time

import torch

from opd.errors import OpdError
from opd.rollout.backend import HFBackend
from opd.rollout.prompts import encode_prompts
from opd.teachers.local import LocalTeacher, score, teacher_hidden
from opd.teachers.pool import TeacherPool

# The teacher's mean log-prob per token on the student's samples is implausibly low below
#     max(log(1/V), own - GAP_NATS),   own = its mean log-prob on its own greedy answers.
# log(1/V): a teacher that reads the student's text in the student's context does better than a guess
# without any context, unless the student writes noise (a random init). own - 3 nats: the student's tokens
# 20x less likely, per token, than the teacher's own choices; a student that knows the task's format
# stays well within that (docs/preflight.md has the measured values), a teacher reading another template
# or misaligned tokens scores them like noise. With a vocabulary of 150k, log(1/V) = -11.9 and the gap
# decides; with a char vocabulary of 20, log(1/V) = -3.0 and the two coincide.
GAP_NATS = 3.0
SELF_TEST_KL = 1e-4  # nats/token; identical inputs give float rounding only (0.0 measured in float32)
SELF_TEST_STEPS = 3
MAX_NEW_TOKENS = 64  # preflight completions: enough to see a template mismatch, cheap on long-answer tasks
SHOW_CHARS = 160  # a displayed prompt or completion is cut to about this many characters


def preflight(run, *, self_test: bool = False, n: int = 3, out=sys.stderr) -> dict:
    """Check `run` (opd.run.build_run) before step 1; print a short report to `out`, raise OpdError on
    an error, print warnings, and return what was found (JSON-able, for the manifest)."""
    t0 = time.perf_counter()
    tokens = check_tokens(run.tokenizer, run.student.model, run.teachers.teachers)
    examples = pick_examples(run.teachers, run.task.train, n)
    rows = sample_and_score(run, examples)
    logprob = judge_logprobs(rows, run.teachers.teachers, len(run.tokenizer))
    warnings = bos_warnings(run, examples) + [v["warning"] for v in logprob.values() if v["warning"]]
    found = {"n": len(examples), "tokens": tokens, "prompts": rows, "logprob": logprob, "warnings": warnings}
    print_report(found, out)
    warn(out, warnings)  # before the self-test, which raises when it fails
    if self_test:
        found["self_test"] = run_self_test(run, examples)
        print_self_test(found["self_test"], out)
        late = [v["warning"] for v in found["self_test"].values() if v["warning"]]
        warn(out, late)
        warnings += late
    found["seconds"] = round(time.perf_counter() - t0, 3)
    return found


# -- tokens ----------------------------------------------------------------------------------------
def special_tokens(tokenizer) -> dict:
    return {f"{kind}{suffix}": getattr(tokenizer, f"{kind}_token{suffix}", None)
            for kind in ("eos", "pad", "bos") for suffix in ("", "_id")}


def check_tokens(tokenizer, model, teachers) -> dict:
    """EOS, PAD and BOS of the student and of every teacher with a tokenizer here (a served teacher is
    sent the student's ids and stops at the student's EOS). Errors: no EOS or PAD, an EOS outside the
    student's output layer, an EOS the teacher does not share. PAD = EOS is fine: opd marks padding with
    attention and completion masks, never by token id, and a completion keeps its first EOS."""
    mine = special_tokens(tokenizer)
    for kind in ("eos", "pad"):
        if mine[f"{kind}_id"] is None:
            raise OpdError(f"the student's tokenizer has no {kind.upper()} token: set {kind}_token in its "
                           f"tokenizer_config.json")
    rows = getattr(model.config, "vocab_size", None)
    if rows is not None and mine["eos_id"] >= rows:
        raise OpdError(f"the student's EOS {mine['eos']!r} (id {mine['eos_id']}) is past its output layer "
                       f"({rows} rows), so it can never stop: resize_token_embeddings after adding tokens")
    found = {"student": mine, "teachers": {}, "notes": []}
    for t in teachers:
        tok = getattr(t, "tokenizer", None)
        if tok is None:
            continue
        theirs = found["teachers"][t.name] = special_tokens(tok)
        if getattr(t, "cross_tokenizer", False):  # another tokenizer: the student's EOS is mapped explicitly
            found["notes"].append(f"{t.name}: {t.end_rule}")
            continue
        if theirs["eos_id"] != mine["eos_id"]:
            raise OpdError(f"EOS differs: the student ends with {mine['eos']!r} (id {mine['eos_id']}) but teacher "
                           f"{t.name!r} with {theirs['eos']!r} (id {theirs['eos_id']}), so the teacher scores "
                           f"the student's stop as wrong; set the student's eos_token to {theirs['eos']!r} "
                           f"(tokenizer_config.json), or pair a base student with a base teacher")
    if mine["pad_id"] == mine["eos_id"]:
        found["notes"].append("pad = eos (fine: opd marks padding by mask)")
    return found


def bos_warnings(run, examples) -> list[str]:
    """Prompts that start with BOS twice: the template writes it and the tokenizer adds it again."""
    readers = [("the student", run.tokenizer, encode_prompts(examples, run.task.schema, run.tokenizer))]
    readers += [(f"teacher {t.name!r}", t.tokenizer, t.prompts(examples)) for t in run.teachers.teachers
                if isinstance(t, LocalTeacher) and t.schema is not None]
    return [f"{who} reads prompts that start with BOS twice ({tok.bos_token!r}): the prompt template writes it "
            f"and the tokenizer adds it again; drop it from the template" for who, tok, prompts in readers
            if tok.bos_token_id is not None and any(p[:2] == [tok.bos_token_id] * 2 for p in prompts)]


# -- samples and scores ----------------------------------------------------------------------------
def pick_examples(teachers: TeacherPool, examples, n: int) -> list:
    """The first n training examples of each teacher, so every teacher is checked."""
    picked = {t.name: [] for t in teachers.teachers}
    for ex in examples:
        mine = picked[teachers.route(ex.tag).name]
        if len(mine) < n:
            mine.append(ex)
        if all(len(v) >= n for v in picked.values()):
            break
    return [ex for v in picked.values() for ex in v]


def sample_and_score(run, examples) -> list[dict]:
    """Per example: both renderings, a student sample and the teacher's greedy answer, each with the
    teacher's mean log-prob per token (None where the teacher cannot decode, e.g. a plain server)."""
    cfg, tok = run.cfg, run.tokenizer
    tokens = min(cfg.rollout.max_new_tokens, MAX_NEW_TOKENS)
    prompts = encode_prompts(examples, run.task.schema, tok)
    sampler = HFBackend(run.student.model, tok.eos_token_id, tok.pad_token_id, vocab_size=len(tok),
                        kv_cache_gib=cfg.rollout.kv_cache_gib)
    student = sampler.generate(prompts, max_new_tokens=tokens, temperature=cfg.rollout.temperature,
                               seed=cfg.train.seed)
    scores, names = run.teachers.score(student, examples)
    on_student = row_means(scores.logprobs, student.completion_mask)
    own = row_means(student.sample_logprobs, student.completion_mask)
    rows = [{"teacher": name, "prompt": show(tok.decode(p)), "teacher_prompt": None,
             "student_sample": show(completion_text(tok, student, i)), "teacher_logprob_on_sample": on_student[i],
             "student_logprob_on_sample": own[i], "teacher_answer": None, "teacher_logprob_on_answer": None}
            for i, (p, name) in enumerate(zip(prompts, names))]
    for t, idx in run.teachers.split(examples):
        mine = [examples[i] for i in idx]
        if isinstance(t, LocalTeacher) and t.schema is not None:
            for i, ids in zip(idx, t.prompts(mine)):
                rows[i]["teacher_prompt"] = show(t.tokenizer.decode(ids))
        if getattr(t, "cross_tokenizer", False):  # one aligned example per row: the spans of both tokenizers
            for i, ids in zip(idx, t.prompts(mine)):
                rows[i]["teacher_prompt"] = show(t.tokenizer.decode(ids))
                rows[i]["aligned"] = show(t.show(student, i))
        try:
            answers = t.generate([prompts[i] for i in idx], mine, max_new_tokens=tokens, greedy=True)
        except OpdError:  # e.g. a served teacher without a generation endpoint: scored on samples only
            continue
        lp = row_means(t.score(answers, mine).logprobs, answers.completion_mask)
        for j, i in enumerate(idx):
            rows[i]["teacher_answer"] = show(completion_text(tok, answers, j))
            rows[i]["teacher_logprob_on_answer"] = lp[j]
    return rows


def row_means(values: torch.Tensor, mask: torch.Tensor) -> list[float | None]:
    """Mean over each row's completion tokens (None for an empty completion)."""
    mask = mask.float()
    sums, counts = (values.float() * mask).sum(1).tolist(), mask.sum(1).tolist()
    return [round(s / c, 4) if c else None for s, c in zip(sums, counts)]


def completion_text(tokenizer, batch, row: int) -> str:
    ids = [t for t, m in zip(batch.completion_ids[row].tolist(), batch.completion_mask[row].tolist()) if m]
    return tokenizer.decode(ids, skip_special_tokens=False)


def show(text: str) -> str:
    """Text cut in the middle to about SHOW_CHARS (a long system prompt should not hide the end)."""
    if len(text) <= SHOW_CHARS:
        return text
    half = SHOW_CHARS // 2
    return f"{text[:half]} … {text[-half:]}"


def judge_logprobs(rows: list[dict], teachers, vocab: int) -> dict:
    """Per teacher: mean log-prob per token on its own greedy answers and on the student's samples,
    the threshold (see GAP_NATS), and a warning when the student's samples fall below it or when the
    teacher scores its own greedy answers below uniform (its decoding and scoring disagree)."""
    uniform = -math.log(vocab)
    found = {}
    for t in teachers:
        mine = [r for r in rows if r["teacher"] == t.name]
        if not mine:
            continue
        on_samples = mean(r["teacher_logprob_on_sample"] for r in mine)
        own = mean(r["teacher_logprob_on_answer"] for r in mine)
        threshold = max(uniform, own - GAP_NATS) if own is not None else uniform
        warning = None
        if own is not None and own < uniform:
            warning = (f"teacher {t.name!r} scores its own greedy answers at {own:.2f}/token, below uniform "
                       f"({uniform:.2f}): its decoding and scoring read different tokens (positions, padding)")
        elif on_samples is not None and on_samples < threshold:
            warning = (f"teacher {t.name!r} gives the student's samples {on_samples:.2f}/token, below "
                       f"{threshold:.2f} (uniform {uniform:.2f}; its own greedy answers {_fmt(own)}): it is not "
                       f"reading what the student wrote; check task.prompt_schema / task.teacher_prompt_schema "
                       f"(an instruct teacher wants 'chat'), unless the student writes noise (a random init) or "
                       f"answers in another format than the teacher (compare the sample and the answer above)")
        found[t.name] = {"own_greedy": own, "student_samples": on_samples, "uniform": round(uniform, 4),
                         "threshold": round(threshold, 4), "low": warning is not None, "warning": warning}
    return found


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# -- self-test -------------------------------------------------------------------------------------
class _SentIds:
    """Stand-in for a served teacher: the student's frozen weights scoring the token ids as sent."""

    returns, tasks = "logits", ("*",)

    def __init__(self, name: str, model, vocab_size: int):
        self.name, self.model, self.vocab_size = name, model, vocab_size

    def score(self, batch, examples):
        return score(self.model, batch, vocab_size=self.vocab_size)


def twin(teacher, frozen, vocab_size: int):
    """`teacher`'s input path (its prompt schema, its padding) with the student's frozen weights."""
    if not isinstance(teacher, LocalTeacher):
        return _SentIds(teacher.name, frozen, vocab_size)
    double = copy.copy(teacher)
    double.loaded = dataclasses.replace(teacher.loaded, model=frozen)
    double.tasks = ("*",)  # every self-test row goes to it
    if getattr(teacher, "workers", None) is not None:  # Ray-hosted: its actors hold the teacher's weights
        double.hidden = lambda batch: teacher_hidden(frozen, batch)
    return double


def run_self_test(run, examples, steps: int = SELF_TEST_STEPS) -> dict:
    """Per teacher: the reverse KL over `steps` OPD updates of a copy of the student against a frozen copy
    of itself read through the teacher's input path. Above SELF_TEST_KL it is an error, or a warning where
    the teacher reads its own prompt schema on purpose (task.allow_schema_mismatch)."""
    frozen = copy.deepcopy(run.student.model).float().eval().requires_grad_(False)
    found = {}
    for t in run.teachers.teachers:
        kls = self_distil(run, twin(t, frozen, len(run.tokenizer)), examples, steps)
        passed = max(kls) <= SELF_TEST_KL
        found[t.name] = {"steps": steps, "reverse_kl": kls, "limit": SELF_TEST_KL, "passed": passed,
                         "warning": None if passed else self_test_failure(t, run.schema_check.get(t.name, {}), kls)}
    return found


def self_distil(run, teacher, examples, steps: int) -> list[float]:
    """The reverse KL of each of `steps` updates (opd.train.step.update, exact reverse KL, on its own
    samples) of a float32 copy of the student against `teacher`; the run's student and optimizer are
    untouched. Plain SGD without weight decay: at KL = 0 the gradient is float noise, which SGD leaves in
    place but Adam would scale up to lr-sized steps."""
    from opd.config import ObjectiveConfig
    from opd.methods import MethodOptions, make_method
    from opd.objectives.select import make_objective
    from opd.train.step import update

    cfg, tok = run.cfg, run.tokenizer
    train_cfg = dataclasses.replace(cfg.train, precision="float32", weight_decay=0.0)
    method, objective = make_method(MethodOptions(name="opd")), make_objective(ObjectiveConfig(name="reverse_kl"))
    pool = TeacherPool([teacher], run.task.schema, tok)
    prompts = encode_prompts(examples, run.task.schema, tok)
    student = copy.deepcopy(run.student.model).float().train()
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    sampler = HFBackend(student, tok.eos_token_id, tok.pad_token_id, vocab_size=len(tok),
                        kv_cache_gib=cfg.rollout.kv_cache_gib)
    kls = []
    for step in range(steps):
        batch = sampler.generate(prompts, max_new_tokens=min(cfg.rollout.max_new_tokens, MAX_NEW_TOKENS),
                                 temperature=cfg.rollout.temperature, seed=cfg.train.seed + step)
        scores, _ = pool.score(batch, examples)
        stats = update(student, optimizer, scheduler, method, objective, batch, train_cfg, scores=scores,
                       rollout_temperature=cfg.rollout.temperature, vocab_size=len(tok))
        kls.append(float(stats["reverse_kl"]))
    return kls


def self_test_failure(teacher, schema_check: dict, kls: list[float]) -> str:
    """The warning for a deliberate schema difference; an OpdError otherwise."""
    worst = max(range(len(kls)), key=kls.__getitem__)
    what = (f"self-test: a student distilled into a frozen copy of itself through teacher {teacher.name!r} has a "
            f"reverse KL of {kls[worst]:.2g}/token at step {worst + 1} (limit {SELF_TEST_KL:g})")
    if schema_check.get("identical") is False:
        return f"{what}, as expected: the teacher reads its own prompt schema (task.allow_schema_mismatch)"
    raise OpdError(f"{what}: teacher and student see different inputs (prompt rendering, position ids or "
                   f"padding), or the student has dropout; a model that ignores position_ids or the attention "
                   f"mask cannot be distilled with opd")


# -- report ----------------------------------------------------------------------------------------
def print_report(found: dict, out) -> None:
    p = functools.partial(print, file=out)
    p(f"opd preflight: {found['n']} prompts")
    for i, r in enumerate(found["prompts"], start=1):
        p(f"  [{i}] prompt          {r['prompt']!r}")
        if r["teacher_prompt"] is not None:
            p(f"      teacher reads   {r['teacher_prompt']!r}")
        p(f"      student sample  {r['student_sample']!r}  teacher {_fmt(r['teacher_logprob_on_sample'])}/token")
        if r.get("aligned"):
            p(f"      aligned spans   {r['aligned']}")
        if r["teacher_answer"] is not None:
            p(f"      teacher answer  {r['teacher_answer']!r}  teacher {_fmt(r['teacher_logprob_on_answer'])}/token")
    s, tokens = found["tokens"]["student"], found["tokens"]
    agree = "teachers agree on eos" if tokens["teachers"] else "served teachers read the student's ids"
    p(f"  tokens: eos {s['eos']!r} ({s['eos_id']}), pad {s['pad']!r} ({s['pad_id']}), bos {s['bos']!r} "
      f"({s['bos_id']}); {'; '.join([agree, *tokens['notes']])}")
    for name, v in found["logprob"].items():
        p(f"  log-prob/token of {name}: own greedy answers {_fmt(v['own_greedy'])}, student samples "
          f"{_fmt(v['student_samples'])} (warn below {v['threshold']:.2f}; uniform {v['uniform']:.2f})"
          + ("  LOW" if v["low"] else ""))


def warn(out, warnings: list[str]) -> None:
    for warning in warnings:
        print(f"opd: warning: {warning}", file=out)


def print_self_test(found: dict, out) -> None:
    for name, v in found.items():
        print(f"  self-test via {name}: reverse KL {', '.join(f'{k:.1e}' for k in v['reverse_kl'])} over "
              f"{v['steps']} steps (limit {v['limit']:g}): {'passed' if v['passed'] else 'FAILED'}", file=out)
