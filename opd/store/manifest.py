"""The run manifest: everything needed to explain and reproduce a run a month later."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import opd
from opd.backends.hf import tokenizer_sha256, weights_sha256


def file_sha256(path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()


def code_version() -> dict:
    """opd's version and, when running from a git checkout, its commit and whether it is dirty."""
    src = Path(__file__).resolve().parents[2]  # the checkout holding opd/, if any
    info = {"opd": opd.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "opd"], cwd=src,
                                   capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def model_entry(loaded, revision) -> dict:
    """The model as loaded; `dtype` is the precision it runs in (a teacher may be cast from its stored one).
    weights_sha256 is of the safetensors files as stored (`weights_hashed`), else of the tensors in memory."""
    model = loaded.model
    return {"name": loaded.name, "revision": revision, "commit": loaded.commit,
            "dtype": str(model.dtype).removeprefix("torch."), "stored_dtype": loaded.stored_dtype,
            "device": str(loaded.device), "device_map": _device_map(model),
            "architecture": type(model).__name__, "num_params": loaded.num_params,
            "embedding_rows": model.get_input_embeddings().num_embeddings,
            "weights_sha256": loaded.weights_hash or weights_sha256(model),
            "weights_hashed": "safetensors files" if loaded.weights_hash else "tensors in memory",
            "tokenizer_sha256": tokenizer_sha256(loaded.tokenizer)}


def _device_map(model) -> dict | None:
    """accelerate's placement of a model spread over devices (None when it sits on one)."""
    placement = getattr(model, "hf_device_map", None)
    return {k: str(v) for k, v in placement.items()} if placement and len(set(placement.values())) > 1 else None


def build_manifest(cfg, teachers, student, task, method, objective, filters, schema_check, argv=None,
                   backend: str = "hf") -> dict:
    """teachers: a TeacherPool (each teacher describes itself); method: the Method object."""
    import torch
    import transformers

    from opd.train.step import student_precision

    return {
        "teacher": teachers.teachers[0].describe(),
        "teachers": teachers.describe(),
        "student": {**model_entry(student, cfg.student.revision),
                    "train_precision": student_precision(cfg.train.precision, student.device),
                    "lora": dataclasses.asdict(cfg.student.lora) if cfg.student.lora.r else None,
                    "trainable_params": sum(p.numel() for p in student.model.parameters() if p.requires_grad),
                    "gradient_checkpointing": cfg.train.gradient_checkpointing,
                    "micro_batch_tokens": cfg.train.micro_batch_tokens},
        "tokenizer": {"sha256": tokenizer_sha256(student.tokenizer), "vocab_size": len(student.tokenizer),
                      "eos": student.tokenizer.eos_token, "pad": student.tokenizer.pad_token},
        "task": {**task.describe(),
                 "train_sha256": file_sha256(cfg.task.train) if cfg.task.train else None,
                 "eval_sha256": file_sha256(cfg.task.eval) if cfg.task.eval else None},
        "prompt_schema": {**task.schema.describe(), "hash": task.schema.schema_hash(), "teachers": schema_check,
                          "allow_mismatch": cfg.task.allow_schema_mismatch},
        "rollout": {"policy": method.samples, "backend": backend, "batch_size": cfg.rollout.batch_size,
                    "samples_per_prompt": cfg.rollout.samples_per_prompt,
                    "max_new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.rollout.temperature,
                    "max_staleness": cfg.rollout.max_staleness,
                    "anchors": {"path": cfg.anchors.path, "fraction": cfg.anchors.fraction,
                                "sha256": file_sha256(cfg.anchors.path) if cfg.anchors.path else None},
                    "top_k": 0, "top_p": 1.0, "scored_until": "first EOS (inclusive)"},
        "method": {**method.describe(), **({"traces_sha256": file_sha256(method.options.traces)}
                                            if getattr(method.options, "traces", None) else {})},
        "filters": filters.describe(),  # ordered rules; each rejected rollout is stored with its rule
        "objective": {"name": objective.name, "requested": cfg.objective.name, **objective.params},
        "seeds": {"train": cfg.train.seed, "task": cfg.task.seed},
        "code": code_version(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "platform": platform.platform()},
        "command": argv or sys.argv,
    }
