"""Experiment tracking: TensorBoard scalars mirror the metrics; a missing package is a one-line error."""

import sys

import pytest

from opd.errors import OpdError
from opd.store.tracking import Tracker


def test_disabled_tracker_does_nothing(tmp_path):
    tracker = Tracker(tmp_path, tensorboard=False, wandb=False, config={"train": {"lr": 1e-3}})
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writes_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(tmp_path, tensorboard=True, wandb=False, config={"train": {"lr": 1e-3}})
    for step in (1, 2, 3):
        tracker.log(step, {"step": step, "loss": 1.0 / step, "reject/min_tokens": step, "sampled_by": "student",
                           "update_applied": True})
    tracker.log(3, {"eval/accuracy": 0.75})
    tracker.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "reject/min_tokens", "update_applied", "eval/accuracy"}
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert [e.value for e in acc.Scalars("eval/accuracy")] == [0.75]


def test_enabled_but_missing_packages_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(OpdError, match="pip install tensorboard"):
        Tracker(tmp_path, tensorboard=True, wandb=False, config={})
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(OpdError, match="pip install wandb"):
        Tracker(tmp_path, tensorboard=False, wandb=True, config={})
