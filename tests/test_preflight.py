"""The preflight before step 1: every check passes on a healthy pair and fails on a pair broken for it."""

import dataclasses
import io
import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from opd.backends.hf import build_char_tokenizer, build_config, init_model, load_model, weights_sha256
from opd.cli.main import main
from opd.config import load_config
from opd.errors import OpdError
from opd.preflight import SELF_TEST_KL, check_tokens, preflight
from opd.run import build_run
from opd.tasks.data import load_jsonl
from opd.tasks.schema import PromptSchema
from opd.teachers import LocalTeacher, TeacherPool
from opd.train.sft import run_sft
from tests.conftest import CHARS


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """Reverse a 1-4 letter string: 'abca=' -> 'acba'."""
    words = ["".join(p) for n in range(1, 5) for p in itertools.product("abc", repeat=n)]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("preflight-task") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n"
                            for w in (rng.choice(words) for _ in range(400))))
    return path


@pytest.fixture(scope="module")
def pair(task_file, tmp_path_factory) -> dict:
    """A teacher that knows the task (150 SFT steps) and a weak student that knows its format (50)."""
    root = tmp_path_factory.mktemp("preflight-pair")
    dirs = {}
    for name, steps in (("teacher", 150), ("student", 50)):
        out = init_model("qwen3", 2, 32, 2, [CHARS], root / name, seed=0)
        m = load_model(str(out), trainable=True)
        run_sft(m.model, m.tokenizer, load_jsonl(task_file), PromptSchema.from_spec("{prompt}"), steps=steps,
                batch_size=32, lr=3e-3, warmup_steps=10, progress=False)
        m.model.save_pretrained(out)
        dirs[name] = out
    return dirs


def overrides(task_file, teacher, student, out, *extra) -> list[str]:
    return [f"teacher.model={teacher}", f"student.model={student}", f"task.train={task_file}",
            f"task.eval={task_file}", "rollout.max_new_tokens=6", "logging.report=false", f"out={out}", *extra]


def build(task_file, teacher, student, out, *extra):
    run, _ = build_run(load_config(None, overrides(task_file, teacher, student, out, *extra)), resume=False)
    return run


def test_a_healthy_pair_passes_every_check_and_leaves_the_run_untouched(task_file, pair, tmp_path):
    run = build(task_file, pair["teacher"], pair["student"], tmp_path / "run")
    weights = weights_sha256(run.student.model)
    out = io.StringIO()
    found = preflight(run, self_test=True, out=out)
    text = out.getvalue()
    assert found["warnings"] == [] and "warning" not in text
    lp = found["logprob"]["teacher"]
    assert lp["threshold"] < lp["student_samples"] < lp["own_greedy"] <= 0
    assert len(found["prompts"]) == 3 and all(r["teacher_answer"].endswith("<eos>") for r in found["prompts"])
    assert "'<bos>" in text  # prompts are shown as token ids decoded, special tokens included
    test = found["self_test"]["teacher"]
    assert test["passed"] and len(test["reverse_kl"]) == 3 and max(test["reverse_kl"]) <= SELF_TEST_KL
    assert "passed" in text
    assert weights_sha256(run.student.model) == weights and run.optimizer.state_dict()["state"] == {}
    json.dumps(found)  # stored in manifest.json as it is


def write_model(out: Path, eos: str) -> Path:
    """A tiny model whose tokenizer knows both end tokens (one vocabulary) and ends with `eos`."""
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer([CHARS])
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_end|>"]})
    tok.eos_token = eos
    AutoModelForCausalLM.from_config(build_config("qwen3", len(tok), 1, 16, 2, tokenizer=tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_base_student_and_an_instruct_teacher_with_other_eos_is_an_error_naming_both(task_file, tmp_path):
    student = write_model(tmp_path / "base", "<|endoftext|>")
    teacher = write_model(tmp_path / "instruct", "<|im_end|>")
    run = build(task_file, teacher, student, tmp_path / "run")
    with pytest.raises(OpdError, match=r"student ends with '<\|endoftext\|>' .* teacher 'teacher' with "
                                       r"'<\|im_end\|>'") as exc:
        preflight(run, out=io.StringIO())
    assert "\n" not in str(exc.value)


def tokenizer(**changes):
    special = dict(eos_token="<eos>", eos_token_id=2, pad_token="<pad>", pad_token_id=0, bos_token="<bos>",
                   bos_token_id=1)
    return SimpleNamespace(**{**special, **changes})


def test_an_eos_the_student_cannot_emit_and_a_missing_pad_are_errors_pad_equal_to_eos_is_not():
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=20))
    with pytest.raises(OpdError, match=r"EOS '<\|im_end\|>' \(id 20\) is past its output layer \(20 rows\)"):
        check_tokens(tokenizer(eos_token="<|im_end|>", eos_token_id=20), model, [])
    with pytest.raises(OpdError, match="no PAD token"):
        check_tokens(tokenizer(pad_token=None, pad_token_id=None), model, [])
    found = check_tokens(tokenizer(pad_token="<eos>", pad_token_id=2), model, [])
    assert found["notes"] == ["pad = eos (fine: opd marks padding by mask)"]


def test_a_teacher_reading_another_template_warns_of_an_implausibly_low_logprob(task_file, pair, tmp_path):
    run = build(task_file, pair["teacher"], pair["student"], tmp_path / "run",
                "task.teacher_prompt_schema=12+{prompt}", "task.allow_schema_mismatch=true")
    out = io.StringIO()
    found = preflight(run, self_test=True, out=out)
    lp = found["logprob"]["teacher"]
    assert lp["low"] and lp["student_samples"] < lp["threshold"]
    assert all(r["teacher_prompt"].startswith("<bos>12+") for r in found["prompts"])
    assert "it is not reading what the student wrote" in out.getvalue()
    # the self-test sees the difference too; it was asked for (allow_schema_mismatch): a warning
    assert not found["self_test"]["teacher"]["passed"]
    assert "as expected: the teacher reads its own prompt schema" in found["warnings"][-1]


def test_a_template_that_writes_bos_before_the_tokenizer_does_warns(task_file, tiny_model_dir, tmp_path):
    run = build(task_file, tiny_model_dir, tiny_model_dir, tmp_path / "run", "task.prompt_schema=<bos>{prompt}")
    found = preflight(run, out=io.StringIO())
    assert any("the student reads prompts that start with BOS twice ('<bos>')" in w for w in found["warnings"])


class OffByOne(LocalTeacher):
    """Scores each completion token with the state one position late: misaligned positions."""

    def hidden(self, batch):
        return super().hidden(batch).roll(1, dims=1)


def test_the_self_test_fails_when_teacher_and_student_see_different_positions(task_file, pair, tmp_path):
    run = build(task_file, pair["teacher"], pair["student"], tmp_path / "run")
    bad = OffByOne("teacher", str(pair["teacher"]), student_schema=run.task.schema)
    run = dataclasses.replace(run, teachers=TeacherPool([bad], run.task.schema, run.tokenizer))
    out = io.StringIO()
    with pytest.raises(OpdError, match="self-test: .* teacher and student see different inputs") as exc:
        preflight(run, self_test=True, out=out)
    assert "\n" not in str(exc.value)
    # warned before the self-test ran: it cannot be scoring the tokens it decoded
    assert "scores its own greedy answers" in out.getvalue()


def test_opd_preflight_reports_and_leaves_no_run_behind(task_file, pair, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"model": str(pair["teacher"])}}))
    argv = ["preflight", str(config), "--self-test", "--json", "--prompts", "2"]
    for item in overrides(task_file, pair["teacher"], pair["student"], out)[1:]:
        argv += ["--set", item]
    assert main(argv) == 0
    captured = capsys.readouterr()
    found = json.loads(captured.out.strip().splitlines()[-1])
    assert found["n"] == 2 and found["self_test"]["teacher"]["passed"]
    assert "opd preflight: 2 prompts" in captured.err  # the report goes to stderr next to --json
    assert not out.exists()  # `opd distill` of this config starts fresh
