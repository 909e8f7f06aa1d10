"""task.chat_template_kwargs: passed to the chat template for student and teacher alike, and hashed."""

from __future__ import annotations

import pytest

from opd.config import DistillConfig, TaskConfig, TeacherConfig
from opd.errors import OpdError
from opd.rollout.prompts import check_turn_end, encode_prompts, turn_end_id
from opd.tasks.data import Example
from opd.tasks.loader import load_task, teacher_schema
from opd.tasks.schema import PromptSchema

# reads a template variable the way Qwen3's does (`enable_thinking`), and ends every turn with EOS
THINKING_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
NO_THINKING = {"enable_thinking": False}
CHARS = "0123456789+=<>/abcdefghijklmnopqrstuvwxyz "


def chat_tokenizer(template: str = THINKING_TEMPLATE):
    """A character tokenizer (no downloads) with a chat template that covers its characters."""
    from opd.backends.hf import build_char_tokenizer

    tok = build_char_tokenizer([CHARS])
    tok.chat_template = template
    return tok


def task_cfg(**overrides) -> TaskConfig:
    return TaskConfig(builtin="addition", n_train=8, n_eval=4, params={"digits": 2}, **overrides)


EXAMPLE = Example("12+34=", "46")


def test_kwargs_change_the_rendered_prompt_and_the_hash():
    tok = chat_tokenizer()
    plain = PromptSchema.from_spec("chat")
    quiet = PromptSchema.from_spec("chat", chat_template_kwargs=NO_THINKING)
    assert plain.render(EXAMPLE, tok) == "<user>12+34=<eos><assistant>"
    assert quiet.render(EXAMPLE, tok) == "<user>12+34=<eos><assistant><think></think>"
    assert quiet.schema_hash() != plain.schema_hash()
    assert quiet.describe()["chat_template_kwargs"] == NO_THINKING  # what the manifest records
    assert "chat_template_kwargs" not in plain.describe()  # a schema without them keeps its old hash
    assert PromptSchema.from_spec(quiet.describe()) == quiet


def test_task_kwargs_apply_unless_a_schema_sets_its_own():
    own = {"kind": "chat", "chat_template_kwargs": {"enable_thinking": True}}
    assert PromptSchema.from_spec(own, chat_template_kwargs=NO_THINKING).chat_template_kwargs == {"enable_thinking": True}
    opted_out = {"kind": "chat", "chat_template_kwargs": {}}
    assert PromptSchema.from_spec(opted_out, chat_template_kwargs=NO_THINKING).chat_template_kwargs == {}
    assert PromptSchema.from_spec("{prompt}", chat_template_kwargs=NO_THINKING).chat_template_kwargs == {}


def test_schema_keeps_its_own_copy_of_the_kwargs():
    kwargs = {"enable_thinking": False}
    schema = PromptSchema.from_spec("chat", chat_template_kwargs=kwargs)
    before = schema.schema_hash()
    kwargs["enable_thinking"] = True
    assert schema.schema_hash() == before


@pytest.mark.parametrize("spec, message", [
    ({"kind": "format", "template": "{prompt}", "chat_template_kwargs": NO_THINKING}, "only used with kind 'chat'"),
    ({"kind": "chat", "chat_template_kwargs": {"tokenize": True}}, "cannot set 'tokenize'"),
    ({"kind": "chat", "chat_template_kwargs": {"when": object()}}, "plain values"),
    ({"kind": "chat", "chat_template_kwargs": ["enable_thinking"]}, "must be a mapping"),
])
def test_bad_kwargs_are_one_line_errors(spec, message):
    with pytest.raises(OpdError, match=message):
        PromptSchema.from_spec(spec)


def test_task_kwargs_without_a_chat_schema_are_an_error():
    with pytest.raises(OpdError, match="task.chat_template_kwargs is only used by a chat prompt schema"):
        load_task(task_cfg(prompt_schema="{prompt}", chat_template_kwargs=NO_THINKING))
    # a chat teacher next to a plain student may use them (with task.allow_schema_mismatch)
    task = load_task(task_cfg(prompt_schema="{prompt}", teacher_prompt_schema="chat", chat_template_kwargs=NO_THINKING))
    assert task.schema.kind == "format"


def test_teacher_and_student_render_identically():
    """The teacher's own schema (same system prompt) picks up the task's kwargs, like the student's."""
    tok = chat_tokenizer()
    spec = {"kind": "chat", "system": "be brief"}
    cfg = task_cfg(prompt_schema=spec, teacher_prompt_schema=spec, chat_template_kwargs=NO_THINKING)
    task = load_task(cfg)
    teacher = teacher_schema(TeacherConfig(model="unused"), cfg)
    assert teacher == task.schema and teacher.schema_hash() == task.schema.schema_hash()
    assert encode_prompts(task.train, teacher, tok) == encode_prompts(task.train, task.schema, tok)
    assert "<think></think>" in task.schema.render(task.train[0], tok)
    # a teacher's own prompt_schema wins over task.teacher_prompt_schema; no schema = the student's
    own = teacher_schema(TeacherConfig(model="unused", prompt_schema={"kind": "chat", "chat_template_kwargs": {}}), cfg)
    assert own.render(EXAMPLE, tok) != task.schema.render(EXAMPLE, tok)
    assert teacher_schema(TeacherConfig(model="unused"), task_cfg(prompt_schema="chat")) is None


def test_pool_teacher_reads_the_students_prompt(tmp_path):
    """Through the real pool: a teacher with its own chat schema, checked token for token."""
    from opd.backends.hf import init_model, load_model
    from opd.teachers.pool import TeacherPool, load_teachers

    folder = init_model("llama", layers=1, hidden=16, heads=2, tokenizer_texts=[CHARS], out=tmp_path / "m")
    student = load_model(str(folder))
    student.tokenizer.chat_template = THINKING_TEMPLATE
    student.tokenizer.save_pretrained(folder)  # the teacher loads the same template from the folder
    spec = {"kind": "chat", "system": "be brief"}
    cfg = DistillConfig(teacher=TeacherConfig(model=str(folder), dtype="float32"),
                        task=task_cfg(prompt_schema=spec, teacher_prompt_schema=spec, chat_template_kwargs=NO_THINKING))
    task = load_task(cfg.task)
    pool = TeacherPool(load_teachers(cfg, student.tokenizer, task.schema), task.schema, student.tokenizer)
    report = pool.check_schemas(task.train, allow_mismatch=False)
    assert report["teacher"]["identical"] and report["teacher"]["hash"] == task.schema.schema_hash()


def test_turn_end_is_found_through_the_template():
    tok = chat_tokenizer()
    schema = PromptSchema.from_spec("chat", chat_template_kwargs=NO_THINKING)
    assert turn_end_id(schema, tok) == tok.eos_token_id
    check_turn_end(schema, tok)
    other = chat_tokenizer(THINKING_TEMPLATE.replace("}}<eos>", "}}<a>"))  # turns end with "<", not EOS
    assert turn_end_id(schema, other) == other.convert_tokens_to_ids("<")
    with pytest.raises(OpdError, match="ends an assistant turn with '<'"):
        check_turn_end(schema, other)
