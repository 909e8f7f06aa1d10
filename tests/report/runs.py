"""Run directories for the report tests: a small real `opd distill` run, and hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from opd.store.samples import SampleStore


def build_models(root: Path) -> tuple[dict, dict]:
    """A teacher with a short SFT (better than chance) and a random student, on string reversal."""
    from opd.backends.hf import init_model, load_model
    from opd.tasks.data import load_jsonl
    from opd.tasks.schema import PromptSchema
    from opd.train.sft import run_sft
    from tests.test_loop import write_reversal_task

    paths = write_reversal_task(root, n_train=300)
    train = load_jsonl(paths["train"])
    dirs = {}
    for name, hidden, steps in (("teacher", 64, 60), ("student", 32, 0)):
        out = init_model("qwen3", 2, hidden, 4, ["abcd="], root / name, seed=0)
        if steps:
            m = load_model(str(out), trainable=True)
            run_sft(m.model, m.tokenizer, train, PromptSchema.from_spec("{prompt}"), steps=steps, batch_size=32,
                    lr=3e-3, warmup_steps=10, progress=False)
            m.model.save_pretrained(out)
        dirs[name] = out
    return paths, dirs


def distill_run(out: Path, paths: dict, dirs: dict, *extra: str) -> Path:
    """4 steps of OPD with a min_tokens filter and evaluations at steps 0, 2 and 4."""
    from opd.config import load_config
    from opd.loop import distill

    cfg = load_config(None, [f"teacher.model={dirs['teacher']}", f"student.model={dirs['student']}",
                             f"task.train={paths['train']}", f"task.eval={paths['eval']}", "rollout.batch_size=8",
                             "rollout.max_new_tokens=6", "train.steps=4", "train.eval_every=2",
                             "train.checkpoint_every=0", "train.warmup_steps=1", "eval.limit=30",
                             "filters=[{rule: min_tokens, n: 2}]", f"out={out}", *extra])
    distill(cfg, progress=False)
    return out


def rollout(step, prompt="ab=", completion="ba", lag=0, kept=True, rule=None, gap=0.0, correct=True):
    """A rollout row whose last token has teacher - student log-prob `gap`."""
    ids = [5 + i for i in range(len(completion))] + [2]
    return {"step": step, "policy_version": step - 1 - lag, "task_tag": "t", "prompt": prompt,
            "completion": completion, "completion_ids": ids, "student_logprobs": [-0.5] * len(ids),
            "teacher_logprobs": [-0.5] * (len(ids) - 1) + [-0.5 + gap], "kept": kept, "reject_rule": rule,
            "correct": correct, "teacher": "t", "truncated": False}


def answer(step, prompt="ab=", completion="ba", expected="ba", correct=True):
    return {"step": step, "prompt": prompt, "completion": completion, "expected": expected, "correct": correct,
            "well_formed": True, "task_tag": "t"}


MANIFEST = {"teacher": {"name": "T", "weights_sha256": "a" * 64, "tokenizer_sha256": "k"},
            "student": {"name": "S", "weights_sha256": "b" * 64, "tokenizer_sha256": "k"},
            "prompt_schema": {"kind": "format", "template": "{prompt}", "hash": "abc123",
                              "teachers": {"teacher": {"identical": True, "hash": "abc123"}}},
            "filters": [{"rule": "min_tokens", "name": "min_tokens", "n": 1}]}


def make_run(root: Path, *, config=None, manifest=None, summary=None, metrics=None, evals=None,
             rollouts=None, answers=None) -> Path:
    """A run directory holding exactly the given parts (None = file absent)."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    for name, obj in (("manifest.json", manifest), ("summary.json", summary)):
        if obj is not None:
            (root / name).write_text(json.dumps(obj))
    for name, lines in (("metrics.jsonl", metrics), ("eval.jsonl", evals)):
        if lines is not None:
            (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = SampleStore(root)
    for step in sorted({r["step"] for r in (rollouts or []) + (answers or [])}):
        store.add_rollouts([r for r in rollouts or [] if r["step"] == step])
        store.add_evals([a for a in answers or [] if a["step"] == step])
        store.flush(step)
    return root


def good_run(root: Path, **overrides) -> Path:
    """A hand-made run on which every checklist item passes."""
    parts = dict(
        config={"rollout": {"max_staleness": 0}, "train": {"lr": 0.001}, "out": str(root)},
        manifest=MANIFEST,
        summary={"teacher_accuracy": 0.9, "student_accuracy_before": 0.3, "student_accuracy_after": 0.8,
                 "gap_closed": 0.83, "steps": 2, "eval_n": 100, "method": "opd"},
        metrics=[{"step": s, "loss": 1.0 / s, "reverse_kl": 1.0 / s, "kept": 3, "reject/min_tokens": 1,
                  "completion_len": 3.0, "tokens_per_s": 100.0} for s in (1, 2)],
        evals=[{"step": 0, "accuracy": 0.3, "teacher_accuracy": 0.9, "n": 100},
               {"step": 2, "accuracy": 0.8, "n": 100, "failures": []}],
        rollouts=[rollout(1), rollout(1, "ac=", "", kept=False, rule="min_tokens", gap=-4.0), rollout(2, gap=-4.0)],
        answers=[answer(0, correct=False), answer(2), answer(2, "cd=", "cc", "dc", correct=False)])
    parts.update(overrides)
    return make_run(root, **parts)
