"""`opd demo`: the embedded default, end to end, with nothing downloaded.

Recipe (its measured result is in the README's quick start): the "reverse addition" task (1-3 digit operands, sum
written least-significant digit first), a Qwen3-architecture teacher (3 layers, hidden 128)
trained by SFT to ~0.99, a 2-layer hidden-64 student given a short SFT so it knows the format but
is weak, then on-policy distillation with the exact reverse KL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from opd.backends.hf import init_model, load_model
from opd.config import load_config
from opd.loop import distill
from opd.tasks.builtin import builtin_split
from opd.tasks.data import save_jsonl
from opd.tasks.schema import PromptSchema
from opd.train.sft import run_sft

TASK = {"builtin": "reverse_addition", "params": {"digits": 3}, "n_train": 20000, "n_eval": 500, "seed": 1234}
TEACHER = {"arch": "qwen3", "layers": 3, "hidden": 128, "heads": 4, "seed": 0, "sft_steps": 1000, "lr": 1e-3}
STUDENT = {"arch": "qwen3", "layers": 2, "hidden": 64, "heads": 4, "seed": 1, "sft_steps": 600, "lr": 1e-3}
OPD = {"steps": 2000, "batch_size": 64, "lr": 1e-3, "max_new_tokens": 8, "eval_every": 400}


def _make_model(spec: dict, texts, out: Path, examples, progress: bool, desc: str) -> float:
    """init-model + SFT; returns the SFT wall time."""
    t0 = time.time()
    init_model(spec["arch"], spec["layers"], spec["hidden"], spec["heads"], texts, out, seed=spec["seed"])
    loaded = load_model(str(out), trainable=True)
    run_sft(loaded.model, loaded.tokenizer, examples, PromptSchema.from_spec("{prompt}"), steps=spec["sft_steps"],
            batch_size=64, lr=spec["lr"], warmup_steps=100, seed=spec["seed"], progress=progress, desc=desc)
    loaded.model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    return time.time() - t0


def run_demo(out: str = "runs/demo", cache_dir: str | None = None, progress: bool = True) -> dict:
    from rich.console import Console

    from opd.cli.summary import print_distill_summary

    console = Console()
    t_start = time.time()
    out_dir = Path(out)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the demo always starts fresh; its teacher is cached elsewhere
    out_dir.mkdir(parents=True)
    train, held_out = builtin_split(TASK["builtin"], TASK["n_train"], TASK["n_eval"], TASK["seed"], **TASK["params"])
    save_jsonl(out_dir / "train.jsonl", train)
    save_jsonl(out_dir / "eval.jsonl", held_out)
    texts = [e.prompt + e.answer for e in train + held_out]

    # 1. Teacher: cached by recipe, so a second demo skips its training.
    key = hashlib.sha256(json.dumps([TASK, TEACHER], sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cache_dir or os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / f"demo-teacher-{key}"
    teacher_seconds = 0.0
    if (cache / "model.safetensors").exists():
        console.print(f"[1/4] teacher: cached at {cache}")
    else:
        console.print("[1/4] teacher: SFT of a 3-layer Qwen3 (hidden 128) on reverse addition")
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        teacher_seconds = _make_model(TEACHER, texts, tmp, train, progress, "teacher sft")
        os.replace(tmp, cache)

    # 2. Student: a short SFT so it knows the format but is weak.
    console.print("[2/4] student: short SFT of a 2-layer Qwen3 (hidden 64)")
    student_dir = out_dir / "student-init"
    student_seconds = _make_model(STUDENT, texts, student_dir, train, progress, "student sft")

    # 3. On-policy distillation through the same path a user's config takes.
    console.print("[3/4] on-policy distillation (student samples, teacher scores every token)")
    cfg = load_config(None, [], base={
        "teacher": {"model": str(cache)}, "student": {"model": str(student_dir)},
        "task": {"train": str(out_dir / "train.jsonl"), "eval": str(out_dir / "eval.jsonl"), "verifier": "exact"},
        "rollout": {"batch_size": OPD["batch_size"], "max_new_tokens": OPD["max_new_tokens"]},
        "train": {"steps": OPD["steps"], "lr": OPD["lr"], "eval_every": OPD["eval_every"],
                  "checkpoint_every": 0},
        # answers have at most 4 digits: a longer completion is off-task and is dropped (kept in the
        # store with this rule's name, see `opd inspect runs/demo/run --rejected`)
        "filters": [{"rule": "max_tokens", "n": 5, "name": "answer_too_long"}],
        "out": str(out_dir / "run"),
    })
    summary = distill(cfg, progress=progress)

    # 4. The same end-of-run summary as `opd distill`, with the time each model took.
    total = time.time() - t_start
    times = {"teacher": f"{teacher_seconds:.0f}s SFT" if teacher_seconds else "cached",
             "before": f"{student_seconds:.0f}s SFT", "after": f"{summary.get('wall_seconds', 0):.0f}s OPD"}
    print_distill_summary(cfg.out, console, title=f"opd demo: reverse addition, {TASK['n_eval']} held-out prompts",
                          notes=times)
    console.print(f"total {total:.0f}s; inspect: opd inspect {cfg.out} --rejected | --failures | --sql 'select ...'")
    return {**summary, "total_seconds": total, "run_dir": cfg.out}
