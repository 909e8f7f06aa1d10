"""The command line as a user meets it: the README's own-task flow, and one-line errors."""

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.cli.main import main


def write_task(root: Path) -> tuple[Path, Path]:
    words = ["".join(p) for n in range(1, 4) for p in itertools.product("abc", repeat=n)]
    rng = random.Random(0)
    held = set(rng.sample(words, 8))
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": w + "=", "answer": w[::-1], "source": "t"}) + "\n"
                             for w in (rng.choice([w for w in words if w not in held]) for _ in range(400))))
    held_out.write_text("".join(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n" for w in sorted(held)))
    return train, held_out


def test_sft_records_what_made_the_model(tmp_path, capsys):
    """`opd sft` leaves sft_summary.json next to the weights: its arguments, steps, loss and every
    evaluation; the last recorded accuracy is what `opd eval` measures on the saved model."""
    train, held_out = write_task(tmp_path)
    assert main(["init-model", "--layers", "1", "--hidden", "32", "--heads", "2", "--tokenizer-data", str(train),
                 "--out", str(tmp_path / "init")]) == 0
    assert main(["sft", "--model", str(tmp_path / "init"), "--data", str(train), "--steps", "30", "--lr", "3e-3",
                 "--warmup", "5", "--batch-size", "16", "--eval", str(held_out), "--eval-every", "10",
                 "--max-new-tokens", "5", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    record = json.loads((tmp_path / "m" / "sft_summary.json").read_text())
    assert record["steps"] == 30 and record["eval_n"] == 8 and record["args"]["lr"] == 3e-3
    assert [e["step"] for e in record["evals"]] == [10, 20, 30] and record["final_loss"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(held_out), "--max-new-tokens", "5",
                 "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["accuracy"] == pytest.approx(record["evals"][-1]["accuracy"])


@pytest.mark.slow
def test_own_jsonl_task_init_sft_distill_eval(tmp_path, capsys, monkeypatch):
    """The README's flow, on a user's JSONL task, with nothing special-cased for built-ins."""
    monkeypatch.chdir(tmp_path)
    train, held_out = write_task(tmp_path)
    assert main(["init-model", "--arch", "llama", "--layers", "2", "--hidden", "32", "--heads", "2",
                 "--tokenizer-data", str(train), "--out", "runs/teacher-init"]) == 0
    assert main(["init-model", "--arch", "qwen3", "--layers", "1", "--hidden", "32", "--heads", "2",
                 "--tokenizer-data", str(train), "--out", "runs/student-init"]) == 0
    assert main(["sft", "--model", "runs/teacher-init", "--data", str(train), "--steps", "150", "--lr", "3e-3",
                 "--warmup", "10", "--out", "runs/teacher", "--no-progress"]) == 0
    assert main(["sft", "--model", "runs/student-init", "--data", str(train), "--steps", "10",
                 "--out", "runs/student", "--no-progress"]) == 0
    Path("run.yaml").write_text(yaml.safe_dump({
        "teacher": {"model": "runs/teacher"}, "student": {"model": "runs/student"},
        "task": {"train": str(train), "eval": str(held_out), "verifier": "exact"},
        "train": {"steps": 20, "eval_every": 10}, "out": "runs/my-opd"}))
    capsys.readouterr()
    assert main(["distill", "run.yaml", "--set", "rollout.batch_size=16", "--set", "rollout.max_new_tokens=6",
                 "--no-progress", "--json"]) == 0
    summary = json.loads(Path("runs/my-opd/summary.json").read_text())
    assert summary["steps"] == 20 and 0 <= summary["student_accuracy_after"] <= 1
    out = capsys.readouterr().out
    # the end-of-run summary for a person, then summary.json (with the checklist) as the last line for scripts
    assert "student before" in out and "95% Wilson interval" in out and "report: runs/my-opd/report.html" in out
    assert "trained student: runs/my-opd/student" in out and "review checklist:" in out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    capsys.readouterr()
    assert main(["eval", "--model", "runs/my-opd/student", "--data", str(held_out), "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n"] == 8 and last["accuracy"] == pytest.approx(summary["student_accuracy_after"])
    assert main(["eval", "--model", "runs/teacher", "--data", str(held_out), "--json"]) == 0
    teacher = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert teacher["accuracy"] == pytest.approx(summary["teacher_accuracy"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A valid task, two tiny models with the same tokenizer, one with another tokenizer, a config."""
    root = tmp_path_factory.mktemp("cli-errors")
    train, held_out = write_task(root)
    for name, data in (("m", str(train)), ("other", None)):
        if data is None:
            (root / "other.txt").write_text("xyz=")
            data = str(root / "other.txt")
        assert main(["init-model", "--layers", "1", "--hidden", "16", "--heads", "2", "--tokenizer-data", data,
                     "--out", str(root / name)]) == 0
    (root / "bad.jsonl").write_text('{"prompt": "a=", "answer": "a"}\n{"prompt": "b=", "answer": \n')
    (root / "noanswer.jsonl").write_text('{"prompt": "a=", "answer": "a"}\n{"prompt": "b="}\n')
    (root / "empty.jsonl").write_text("\n")
    (root / "bad.yaml").write_text("teacher: {model: x\n")
    cfg = {"teacher": {"model": str(root / "m")}, "student": {"model": str(root / "m")},
           "task": {"train": str(train), "eval": str(held_out)}, "train": {"steps": 1}, "out": str(root / "run")}
    (root / "ok.yaml").write_text(yaml.safe_dump(cfg))
    return root


CASES = [
    # (argv with {r} = fixture root, text the one-line message must contain)
    (["sft", "--model", "{r}/m", "--data", "{r}/bad.jsonl", "--steps", "1", "--out", "{r}/o"], "bad.jsonl:2: invalid JSON"),
    (["sft", "--model", "{r}/m", "--data", "{r}/noanswer.jsonl", "--steps", "1", "--out", "{r}/o"], "noanswer.jsonl:2: missing field 'answer'"),
    (["sft", "--model", "{r}/m", "--data", "{r}/missing.jsonl", "--steps", "1", "--out", "{r}/o"], "data file not found"),
    (["sft", "--model", "{r}/m", "--data", "{r}/train.jsonl", "--steps", "0", "--out", "{r}/o"], "must be positive"),
    (["eval", "--model", "{r}/nope", "--data", "{r}/eval.jsonl"], "model not found: {r}/nope"),
    (["eval", "--model", "{r}/m", "--data", "{r}/empty.jsonl"], "no examples"),
    (["eval", "--model", "{r}/m", "--data", "{r}/eval.jsonl", "--verifier", "fuzzy"], "unknown verifier"),
    (["distill", "{r}/ok.yaml", "--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["distill", "{r}/ok.yaml", "--set", "train.steps=many"], "train.steps: expected int"),
    (["distill", "{r}/ok.yaml", "--set", "rollout.batch_size=0"], "rollout.batch_size must be positive"),
    (["distill", "{r}/bad.yaml"], "bad.yaml:"),
    (["distill", "{r}/missing.yaml"], "config file not found"),
    (["distill", "{r}/ok.yaml", "--set", "student.model={r}/gone"], "model not found: {r}/gone"),
    (["distill", "{r}/ok.yaml", "--set", "student.model={r}/other", "--set", "objective.name=reverse_kl"],
     "another tokenizer than the student: its scores are span log-probs"),
    (["distill", "{r}/ok.yaml", "--set", "task.eval={r}/empty.jsonl"], "no examples"),
    (["distill", "{r}/ok.yaml", "--set", "task.verifier=python:nomodule_xyz:f"], "nomodule_xyz"),
    (["distill", "{r}/ok.yaml", "--set", "objective.name=kl9"], "unknown objective"),
    (["distill", "{r}/ok.yaml", "--set", "filters=[{rule: lenght, n: 3}]"], "unknown filter rule 'lenght'"),
    (["distill", "{r}/ok.yaml", "--set", "filters=[{rule: min_tokens}]"], "min_tokens"),
    (["distill", "{r}/ok.yaml", "--set", "train.eval_every=-5"], "train.eval_every must be positive"),
    (["distill", "{r}/ok.yaml", "--set", "train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    (["distill", "{r}/ok.yaml", "--set", "method=dpo"], "unknown method 'dpo'"),
    (["distill", "{r}/ok.yaml", "--set", "method={name: opd, traces: {r}/train.jsonl}"], "method.traces applies to method sft only"),
    (["distill", "{r}/ok.yaml", "--set", "objective.beta=1.5"], "objective.beta must be in [0, 1]"),
    (["eval", "--model", "{r}/m", "--data", "{r}/eval.jsonl", "--max-new-tokens", "0"], "must be positive"),
    (["init-model", "--layers", "1", "--hidden", "15", "--heads", "2", "--tokenizer-data", "{r}/train.jsonl",
      "--out", "{r}/x"], "not divisible"),
    (["init-model", "--layers", "1", "--hidden", "16", "--heads", "2", "--tokenizer-data", "{r}/nothing.jsonl",
      "--out", "{r}/x"], "tokenizer data not found"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[c[1].split(":")[0][:30] for c in CASES])
def test_bad_input_is_one_line_naming_the_problem(setup, capsys, argv, message):
    r = str(setup)
    code = main([a.replace("{r}", r) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("opd: error: ") and "\n" not in err, err
    assert message.replace("{r}", r) in err
    assert "Traceback" not in err


def test_console_script_prints_no_traceback(setup):
    """Through the installed `opd` entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "opd"
    proc = subprocess.run([str(exe), "eval", "--model", str(setup / "nope"), "--data", str(setup / "eval.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"opd: error: model not found: {setup / 'nope'} (no such folder; a hub name looks like org/name)"]
    debug = subprocess.run([str(exe), "--debug", "eval", "--model", str(setup / "nope"), "--data", str(setup / "eval.jsonl")],
                           capture_output=True, text=True, timeout=120)
    assert "Traceback" in debug.stderr


def test_missing_local_model_fails_at_once_without_network(tmp_path, monkeypatch, capsys):
    """A mistyped folder is never sent to the hub: one line, exit 2, well under a second, no connection."""
    import socket
    import time

    import opd.eval.evaluate  # noqa: F401  (imports are not what is timed)
    import transformers  # noqa: F401

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    write_task(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    for name in ("runs/nosuch", "./nosuch", "some/deep/path", "~/nosuch-opd-model", "nosuch"):
        start = time.perf_counter()
        code = main(["eval", "--model", name, "--data", "eval.jsonl"])
        elapsed = time.perf_counter() - start
        err = capsys.readouterr().err
        assert code == 2 and err == f"opd: error: model not found: {name} (no such folder; a hub name looks like org/name)\n"
        assert elapsed < 1.0, (name, elapsed)
    assert attempts == []
