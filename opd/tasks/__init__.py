"""Tasks: example prompts (train + eval), a verifier and a prompt schema."""

from opd.tasks.builtin import BUILTIN_TASKS, TaskFamily, builtin_split, make_builtin
from opd.tasks.data import Example, load_jsonl, save_jsonl
from opd.tasks.schema import PromptSchema
from opd.tasks.verifiers import Verifier, make_verifier

__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "PromptSchema",
    "TaskFamily",
    "Verifier",
    "builtin_split",
    "load_jsonl",
    "make_builtin",
    "make_verifier",
    "save_jsonl",
]
