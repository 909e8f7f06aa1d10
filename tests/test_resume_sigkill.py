"""Crash safety: SIGKILL `opd distill` after two checkpoints, resume, and get the same student."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opd.backends.hf import load_model, weights_sha256
from tests.test_loop import task_and_models  # noqa: F401  (shared module fixture: teacher + weak student)

OPD = str(Path(sys.executable).parent / "opd")


def _config(root, paths, dirs, out):
    cfg = {"teacher": {"model": str(dirs["teacher"])}, "student": {"model": str(dirs["student"])},
           "task": {"train": str(paths["train"]), "eval": str(paths["eval"])},
           "rollout": {"batch_size": 32, "max_new_tokens": 8},
           "train": {"steps": 80, "lr": 3e-3, "eval_every": 40, "checkpoint_every": 5, "keep_checkpoints": 3},
           "out": str(out)}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(task_and_models):  # noqa: F811
    root, paths, dirs = task_and_models
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = root / "k-straight"
    subprocess.run([OPD, "distill", str(_config(root, paths, dirs, straight)), "--no-progress"], env=env,
                   check=True, capture_output=True, timeout=300)

    killed = root / "k-killed"
    cfg = _config(root, paths, dirs, killed)
    proc = subprocess.Popen([OPD, "distill", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    logged = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) >= 10

    subprocess.run([OPD, "distill", str(cfg), "--resume", "--no-progress"], env=env, check=True,
                   capture_output=True, timeout=300)
    a = weights_sha256(load_model(str(straight / "student")).model)
    b = weights_sha256(load_model(str(killed / "student")).model)
    assert a == b
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 81))
    evals = [json.loads(l)["step"] for l in (killed / "eval.jsonl").read_text().splitlines()]
    assert evals == [0, 40, 80]
    assert json.loads((killed / "summary.json").read_text())["student_accuracy_after"] == \
        json.loads((straight / "summary.json").read_text())["student_accuracy_after"]


@pytest.mark.slow
def test_ctrl_c_before_any_checkpoint_keeps_the_finished_steps(task_and_models):  # noqa: F811
    """SIGINT writes a checkpoint of the last finished step and says where; --resume says where it
    resumes from and ends with every step logged once and the student of an uninterrupted run."""
    root, paths, dirs = task_and_models
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = root / "i-straight"
    cfg_straight = _config(root, paths, dirs, straight)
    data = yaml.safe_load(cfg_straight.read_text())
    data["train"].update(steps=30, eval_every=30, checkpoint_every=100)  # no checkpoint before Ctrl-C
    cfg_straight.write_text(yaml.safe_dump(data))
    subprocess.run([OPD, "distill", str(cfg_straight), "--no-progress"], env=env, check=True, capture_output=True,
                   timeout=300)

    stopped = root / "i-stopped"
    cfg = root / "i-stopped.yaml"
    data["out"] = str(stopped)
    cfg.write_text(yaml.safe_dump(data))
    # a shell's background job inherits SIGINT ignored (and Python then keeps ignoring it): restore the default,
    # as in a terminal
    proc = subprocess.Popen([OPD, "distill", str(cfg), "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    kept = len(metrics.read_text().splitlines())
    assert 5 <= kept < 30
    assert f"checkpoint at step {kept}" in err and "--resume" in err
    assert (stopped / "checkpoints" / f"step-{kept:07d}").is_dir()

    done = subprocess.run([OPD, "distill", str(cfg), "--resume", "--no-progress", "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {stopped} from step {kept}" in done.stderr
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == list(range(1, 31))
    a = weights_sha256(load_model(str(straight / "student")).model)
    assert a == weights_sha256(load_model(str(stopped / "student")).model)


def test_resume_of_a_run_that_does_not_exist_is_an_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"teacher: {{model: t}}\nstudent: {{model: s}}\ntask: {{builtin: addition}}\n"
                   f"out: {tmp_path / 'nosuch'}\n")
    done = subprocess.run([OPD, "distill", str(cfg), "--resume"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"no run at {tmp_path / 'nosuch'}" in done.stderr and len(done.stderr.strip().splitlines()) == 1
