"""Data-parallel training on torch.distributed (gloo, 2 CPU ranks) against the single-process run.

The 2-rank jobs run as `opd distill --nproc 2` subprocesses (OMP_NUM_THREADS=1 each); the reference
runs in this process. One uninterrupted 2-rank run serves the parity and the kill/resume tests.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from opd.backends.hf import load_model
from opd.cli.launch import cause, without_nproc
from opd.cli.main import main
from opd.config import load_config
from opd.errors import OpdError
from opd.loop import distill
from opd.run import check_split
from opd.store.samples import SampleStore
from opd.world import World
from tests.test_loop import task_and_models  # noqa: F401  (module fixture: teacher + weak student)

OPD = str(Path(sys.executable).parent / "opd")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 8


def write_config(root, paths, dirs, out: Path, **train) -> Path:
    """Micro-batches of 3 rows (2 per rank's 4) and 96-logit chunks: the update's accumulation paths on."""
    cfg = {"teacher": {"model": str(dirs["teacher"])}, "student": {"model": str(dirs["student"])},
           "task": {"train": str(paths["train"]), "eval": str(paths["eval"])},
           "rollout": {"batch_size": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
           "filters": [{"rule": "dedupe"}],  # judges the whole step's batch: the ranks must agree
           "train": {"steps": STEPS, "lr": 3e-3, "eval_every": STEPS, "checkpoint_every": 2, "keep_checkpoints": 10,
                     "micro_batch_size": 3, "logits_chunk": 96, **train},
           "eval": {"limit": 24}, "logging": {"report": False}, "out": str(out)}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    return {k: v.double() for k, v in load_model(str(run / "student")).model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(task_and_models):  # noqa: F811
    """The same config in one process and on 2 gloo ranks."""
    root, paths, dirs = task_and_models
    single, ranks2 = root / "dp-single", root / "dp-2ranks"
    distill(load_config(str(write_config(root, paths, dirs, single)), []), progress=False)
    done = subprocess.run([OPD, "distill", str(write_config(root, paths, dirs, ranks2)), "--nproc", "2",
                           "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, paths, dirs, single, ranks2


def test_two_ranks_match_one_process_step_for_step(runs):
    *_, single, ranks2 = runs
    a, b = metrics(single), metrics(ranks2)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # every step logged once, by rank 0
    for x, y in zip(a, b):
        assert y["kept"] == x["kept"]
        for key in ("loss", "reverse_kl", "grad_norm", "teacher_logprob", "train_reward", "completion_len"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (x["step"], key)
        assert y["flops"] == pytest.approx(x["flops"], rel=1e-9)
    assert sum(r.get("reject/dedupe", 0) for r in a) > 0  # the batch-wide rule did reject something
    wa, wb = weights(single), weights(ranks2)
    for name in wa:
        assert torch.allclose(wb[name], wa[name], rtol=1e-5, atol=1e-7), name
    ea = [json.loads(line) for line in (single / "eval.jsonl").read_text().splitlines()]
    eb = [json.loads(line) for line in (ranks2 / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["n"], r["accuracy"]) for r in eb] == [(r["step"], r["n"], r["accuracy"]) for r in ea]


def test_fsdp2_matches_one_process_and_resumes(runs):
    """train.fsdp: parameters, gradients and optimizer state sharded over the 2 ranks (FSDP2 on gloo)."""
    root, paths, dirs, single, _ = runs
    sharded = root / "dp-fsdp"
    cfg = write_config(root, paths, dirs, sharded, fsdp=True)
    done = subprocess.run([OPD, "distill", str(cfg), "--nproc", "2", "--no-progress"], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for x, y in zip(metrics(single), metrics(sharded)):
        assert y["kept"] == x["kept"]
        for key in ("loss", "reverse_kl", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7), (x["step"], key)
    wa, wb = weights(single), weights(sharded)
    for name in wa:
        assert torch.allclose(wb[name], wa[name], rtol=1e-5, atol=1e-7), name
    assert json.loads((sharded / "manifest.json").read_text())["distributed"]["student"] == "fsdp2"
    # a resume from the last gathered checkpoint (step 6) redoes steps 7 and 8 exactly
    assert sorted(p.name for p in (sharded / "checkpoints").glob("step-*"))[-1] == "step-0000006"
    straight = [json.loads(line) for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    (sharded / "summary.json").unlink()
    done = subprocess.run([OPD, "distill", str(cfg), "--nproc", "2", "--resume", "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = metrics(sharded)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for x, y in zip(straight, again):
        assert (x["loss"], x["grad_norm"], x["kept"]) == (y["loss"], y["grad_norm"], y["kept"])
    assert all(torch.equal(wb[k], weights(sharded)[k]) for k in wb)


def test_the_store_holds_each_rollout_once_and_rank_0_owns_the_run(runs):
    *_, single, ranks2 = runs
    query = "select step, prompt, completion, kept, reject_rule, source from rollouts order by all"
    a, b = SampleStore(single).rows(query), SampleStore(ranks2).rows(query)
    assert len(b) == STEPS * 8 and b == a
    evals = "select step, prompt, completion, correct from evals order by all"
    assert SampleStore(ranks2).rows(evals) == SampleStore(single).rows(evals)
    manifest = json.loads((ranks2 / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["backend"] == "gloo"
    assert manifest["distributed"]["student"] == "replicated"
    assert len(manifest["distributed"]["hosts"]) == 2
    assert json.loads((single / "manifest.json").read_text())["distributed"]["world_size"] == 1
    state = torch.load(ranks2 / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2
    assert json.loads((ranks2 / "summary.json").read_text())["steps"] == STEPS


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the process running `rank` under the launcher (its RANK in /proc/PID/environ)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            parents = _ancestors(int(proc.name))
        except OSError:
            continue
        if launcher in parents and f"RANK={rank}".encode() in env and b"OPD_ERROR_DIR" in b"\0".join(env):
            return int(proc.name)
    return None


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_job_in_one_line_and_resume_matches(runs):
    root, paths, dirs, _, ranks2 = runs
    killed = root / "dp-killed"
    cfg = write_config(root, paths, dirs, killed)
    proc = subprocess.Popen([OPD, "distill", str(cfg), "--nproc", "2", "--no-progress"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.05)
    victim = rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "opd: error: rank 1 of 2 failed: killed by SIGKILL (out of host memory, or killed from " \
                        "outside); the other ranks were stopped"
    assert not (killed / "summary.json").exists()

    done = subprocess.run([OPD, "distill", str(cfg), "--nproc", "2", "--resume", "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(killed)] == list(range(1, STEPS + 1))
    for x, y in zip(metrics(ranks2), metrics(killed)):
        assert {k: v for k, v in x.items() if not k.startswith("time") and k != "tokens_per_s"} == \
            {k: v for k, v in y.items() if not k.startswith("time") and k != "tokens_per_s"}
    wa, wb = weights(ranks2), weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical to the uninterrupted 2-rank run
    assert SampleStore(killed).rows("select count(*) as n from rollouts")[0]["n"] == STEPS * 8


def test_a_step_that_cannot_be_split_is_refused_before_any_model_loads(tmp_path, capsys):
    cfg = load_config(None, ["student.model=/nonexistent", "teacher.model=/nonexistent", "task.builtin=reversal",
                             "rollout.batch_size=8", f"out={tmp_path / 'r'}"])
    check_split(cfg, 2)  # 8 rows over 2 ranks: fine
    with pytest.raises(OpdError, match="8 rows per step, which do not split .* over 3 ranks: make the rows per "
                                       "step a multiple of 3"):
        check_split(cfg, 3)
    with pytest.raises(OpdError, match="too few for 16 ranks"):
        check_split(cfg, 16)
    cfg.rollout.samples_per_prompt = 3  # 24 rows: 12 per rank, whole groups of 3
    check_split(cfg, 2)
    cfg.rollout.samples_per_prompt, cfg.rollout.batch_size = 2, 3  # 6 rows, 3 per rank: a group of 2 is cut
    with pytest.raises(OpdError, match="multiple of 4"):
        check_split(cfg, 2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "/nonexistent"}, "teacher": {"model": "/nonexistent"},
                                    "task": {"builtin": "reversal"}, "rollout": {"batch_size": 8}, "out": str(tmp_path / "r")}))
    assert main(["distill", str(path), "--nproc", "3"]) == 2  # refused here: no rank started, no model read
    assert "over 3 ranks" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_one_process_world_answers_locally():
    world = World()
    assert world.main and world.size == 1 and world.sum(2, 3.5) == [2.0, 3.5] and world.gather([1, 2]) == [1, 2]
    assert world.on_main(lambda: 7) == 7
    shares = [World(rank=r, size=3).share(10) for r in range(3)]
    assert shares == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert [World(rank=r, size=4).share(2) for r in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 2), slice(2, 2)]


def test_launcher_helpers(tmp_path):
    assert without_nproc(["distill", "c.yaml", "--nproc", "2", "--resume", "--nproc=4"]) == \
        ["distill", "c.yaml", "--resume"]
    assert cause(-9, tmp_path / "none") == "killed by SIGKILL (out of host memory, or killed from outside)"
    assert cause(1, tmp_path / "none") == "exit code 1 (see its output above)"
    (tmp_path / "rank-1").write_text("teacher.model /x does not exist")
    assert cause(2, tmp_path / "rank-1") == "teacher.model /x does not exist"
