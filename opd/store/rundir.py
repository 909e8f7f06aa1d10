"""The run directory: resolved config, manifest, metrics, evals, summary, checkpoints, final student.

Files are written atomically (temp file + fsync + rename) so a crash never leaves half a JSON
file; JSONL logs are appended line by line and flushed, and truncated back to the last
checkpoint on resume so every step appears exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from opd.errors import OpdError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, root: str | Path, writes: bool = True):
        """`writes`: False on every rank but 0 of a distributed job: it reads the run, rank 0 writes it."""
        self.root = Path(root)
        self.writes = writes
        self.metrics_path = self.root / "metrics.jsonl"
        self.eval_path = self.root / "eval.jsonl"
        self.checkpoints = self.root / "checkpoints"

    def create(self, resume: bool) -> None:
        if not self.writes:
            return
        if not resume and (self.metrics_path.exists() or self.checkpoints.exists()):
            raise OpdError(f"run directory {self.root} already holds a run; use --resume or another 'out'")
        self.root.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj) -> None:
        if not self.writes:
            return
        atomic_write_text(self.root / name, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def append(self, path: Path, record: dict) -> None:
        if not self.writes:
            return
        with open(path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def log_metrics(self, record: dict) -> None:
        self.append(self.metrics_path, record)

    def log_eval(self, record: dict) -> None:
        self.append(self.eval_path, record)

    def truncate_after(self, step: int) -> None:
        """Drop log lines written after the checkpoint at `step` (they will be redone)."""
        if not self.writes:
            return
        for path in (self.metrics_path, self.eval_path):
            keep = [r for r in read_jsonl(path) if r["step"] <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, step: int, model, tokenizer, trainer_state: dict, keep: int, state_dict=None) -> Path:
        """Write checkpoints/step-N atomically: weights (safetensors) + optimizer/scheduler state.

        A peft PeftModel writes only its adapter (adapter_config.json + adapter_model.safetensors): a
        resume loads the base model and this adapter (`is_adapter_checkpoint`). `state_dict`: the model's
        gathered weights when its parameters are sharded (FSDP2)."""
        if not self.writes:
            return self.checkpoints / f"step-{step:07d}"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step-{step:07d}"
        tmp = self.checkpoints / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.list_checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.pt").exists())

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.list_checkpoints()
        if not ckpts:
            return None
        return int(ckpts[-1].name.split("-")[1]), ckpts[-1]

    @staticmethod
    def is_adapter_checkpoint(ckpt: Path) -> bool:
        """True when the checkpoint holds a LoRA adapter only (the base model comes from student.model)."""
        return (ckpt / "adapter_config.json").exists()

    @staticmethod
    def load_trainer_state(ckpt: Path) -> dict:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)


def load_tokenizer(run: Path):
    """The run's tokenizer (final student, else latest checkpoint), or None when there is none."""
    candidates = [run / "student", *sorted((run / "checkpoints").glob("step-*"), reverse=True)]
    for path in candidates:
        if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
            try:
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(str(path))
            except Exception:  # an unreadable tokenizer only costs the token view
                return None
    return None
