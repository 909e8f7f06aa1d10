"""Resolve the `task:` config section into prompts, a verifier and a prompt schema."""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import OpdError
from opd.tasks import builtin
from opd.tasks.builtin import builtin_split
from opd.tasks.data import load_jsonl
from opd.tasks.schema import PromptSchema
from opd.tasks.verifiers import make_verifier


@dataclass
class Task:
    train: list  # list[Example]: the prompt pool rollouts are drawn from
    eval: list  # list[Example]: held-out prompts
    verifier: object
    schema: PromptSchema
    source: dict  # where the prompts came from (builtin name + params + seed, or file paths)
    env: object = None  # multi-turn tasks: the environment (opd/rollout/episodes.py), else None

    def describe(self) -> dict:
        env = {"env": self.env.spec, "env_params": self.source.get("env_params", {})} if self.env is not None else {}
        return {**self.source, "verifier": self.verifier.spec, "n_train": len(self.train), "n_eval": len(self.eval),
                **env}


def load_task(cfg) -> Task:
    """Built-in family (generated from a seed) or user JSONL files; never both."""
    if cfg.builtin and (cfg.train or cfg.eval):
        raise OpdError("task: give either 'builtin' or 'train'/'eval' files, not both")
    if cfg.builtin:
        train, held_out = builtin_split(cfg.builtin, cfg.n_train, cfg.n_eval, cfg.seed, **cfg.params)
        source = {"builtin": cfg.builtin, "params": dict(cfg.params), "seed": cfg.seed}
    else:
        train, held_out = load_jsonl(cfg.train), load_jsonl(cfg.eval)
        source = {"train": str(cfg.train), "eval": str(cfg.eval)}
    spec = cfg.env or getattr(builtin, "BUILTIN_ENVS", {}).get(cfg.builtin)  # a family may bring its environment
    env = None
    if spec:
        from opd.rollout.episodes import load_env

        env = load_env(spec, cfg.env_params)
        source["env_params"] = dict(cfg.env_params)
    return Task(train=train, eval=held_out, verifier=make_verifier(cfg.verifier),
                schema=student_schema(cfg), source=source, env=env)


def student_schema(cfg) -> PromptSchema:
    """`task.prompt_schema`, a chat schema rendered with `task.chat_template_kwargs` unless it sets its own."""
    schema = PromptSchema.from_spec(cfg.prompt_schema, cfg.chat_template_kwargs)
    teacher = cfg.teacher_prompt_schema
    if cfg.chat_template_kwargs and schema.kind != "chat" and not (teacher and _is_chat(teacher)):
        raise OpdError("task.chat_template_kwargs is only used by a chat prompt schema, and task.prompt_schema "
                       f"is {cfg.prompt_schema!r}: set task.prompt_schema: chat or drop the kwargs")
    return schema


def teacher_schema(spec, task_cfg) -> PromptSchema | None:
    """A teacher's own rendering: its `prompt_schema`, else `task.teacher_prompt_schema`, with the task's
    chat_template_kwargs like the student's; None = it reads exactly the student's prompt."""
    chosen = spec.prompt_schema or task_cfg.teacher_prompt_schema
    return PromptSchema.from_spec(chosen, task_cfg.chat_template_kwargs) if chosen else None


def _is_chat(spec) -> bool:
    return PromptSchema.from_spec(spec).kind == "chat"
