"""A distill run whose teacher is `opd serve-teacher` over HTTP: log-probs only, so the default
objective becomes the clipped sampled-token reverse KL; a teacher killed mid-run is waited for."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.backends.test_server import free_port, start_server, stop
from tests.test_loop import task_and_models  # noqa: F401  (module fixture: teacher + weak student)

OPD = str(Path(sys.executable).parent / "opd")


def write_config(root, paths, dirs, url, out, steps):
    cfg = (f"teacher: {{url: '{url}', api_key_env: OPD_TEST_TEACHER_TOKEN}}\n"
           f"student: {{model: '{dirs['student']}'}}\n"
           f"task: {{train: '{paths['train']}', eval: '{paths['eval']}'}}\n"
           f"rollout: {{batch_size: 16, max_new_tokens: 8}}\n"
           f"train: {{steps: {steps}, lr: 1.0e-3, eval_every: 100, checkpoint_every: 0}}\n"
           f"out: '{out}'\n")
    path = root / f"{out.name}.yaml"
    path.write_text(cfg)
    return path


@pytest.mark.slow
def test_distill_with_a_served_teacher_survives_a_teacher_restart(task_and_models):  # noqa: F811
    root, paths, dirs = task_and_models
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(dirs["teacher"], port, "tok")
    out = root / "remote-run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_TEST_TEACHER_TOKEN": "tok"}
    run = subprocess.Popen([OPD, "distill", str(write_config(root, paths, dirs, url, out, 40)), "--no-progress"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)  # the teacher dies mid-run ...
    stop(server)
    time.sleep(3)
    assert run.poll() is None  # ... and the run waits for it instead of failing
    server = start_server(dirs["teacher"], port, "tok")  # ... comes back on the same address
    try:
        stdout, stderr = run.communicate(timeout=300)
    finally:
        stop(server)
    assert run.returncode == 0, stderr
    assert "unreachable, retrying" in stderr
    records = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))  # every step logged exactly once
    kl = [r["reverse_kl"] for r in records]  # k3 estimate from the served log-probs
    assert sum(kl[-10:]) < sum(kl[:10])  # the student moves toward the served teacher
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["objective"]["name"] == "sampled_reverse_kl" and manifest["objective"]["clip"] == 5.0
    assert manifest["teacher"]["url"] == url
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_accuracy"] is None  # a scoring-only server cannot be evaluated greedily
