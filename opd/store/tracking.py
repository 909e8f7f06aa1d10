"""Optional experiment tracking: mirror each step's metrics to TensorBoard and/or Weights & Biases.

metrics.jsonl and eval.jsonl stay the source of truth (the report, diff and resume read only
them); trackers are a view for people who already live in those tools. Both are imported
lazily and only when enabled, so opd never depends on them, and enabling one that is not
installed is a one-line OpdError before any training starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from opd.errors import OpdError


def _scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics record (strings such as `sampled_by` are skipped)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "step"}


class Tracker:
    """`log(step, metrics)` to every enabled backend; a no-op when none is enabled."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, wandb: bool = False,
                 config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.writer = self._tensorboard(config) if tensorboard else None
        self.wandb_run = self._wandb(config) if wandb else None

    def _tensorboard(self, config: dict | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise OpdError("logging.tensorboard is on but the 'tensorboard' package is not installed "
                           "(pip install tensorboard)") from None
        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if config:
            import yaml

            writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        return writer

    def _wandb(self, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise OpdError("logging.wandb is on but the 'wandb' package is not installed (pip install wandb)") from None
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "opd"), name=self.run_dir.name,
                          dir=str(self.run_dir), config=config or {}, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        scalars = _scalars(metrics)
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
