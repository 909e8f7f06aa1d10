"""Prompt schema: how an Example becomes the exact text both teacher and student see.

Teacher and student must condition on the same prompt string, so rendering is a pure function of
(schema, example, tokenizer's chat template). The schema hash goes into the run manifest so two
runs can be checked for identical prompting.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import asdict, dataclass, field

from opd.errors import OpdError
from opd.tasks.data import Example

KINDS = ("format", "chat")
DEFAULT_TEMPLATE = "{prompt}"
FIELDS = ("kind", "template", "system", "chat_template_kwargs")
# apply_chat_template arguments opd sets itself, or that would make it return something other than text
RESERVED_KWARGS = frozenset({"conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                             "return_dict", "return_tensors", "return_assistant_tokens_mask"})


@dataclass(frozen=True)
class PromptSchema:
    """`format`: a Python format string over the prompt and extra fields; `chat`: the tokenizer's
    chat template with an optional system message and the prompt as the user turn, rendered with
    `chat_template_kwargs` (e.g. {"enable_thinking": False}) as extra template variables."""

    kind: str = "format"
    template: str = DEFAULT_TEMPLATE
    system: str | None = None
    # left out of hash() (a dict is unhashable); still compared, described, and part of schema_hash()
    chat_template_kwargs: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise OpdError(f"prompt schema kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.template, str):
            raise OpdError(f"prompt schema template must be a string, got {self.template!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise OpdError(f"prompt schema system must be a string, got {self.system!r}")
        _check_kwargs(self.chat_template_kwargs)
        # a private copy: the config's dict may change later, the schema (and its hash) must not
        object.__setattr__(self, "chat_template_kwargs", dict(self.chat_template_kwargs))
        if self.kind == "format":
            if self.system is not None:
                raise OpdError("prompt schema 'system' is only used with kind 'chat'")
            if self.chat_template_kwargs:
                raise OpdError("prompt schema 'chat_template_kwargs' is only used with kind 'chat'")
            _check_template(self.template)
        elif self.template != DEFAULT_TEMPLATE:
            raise OpdError("prompt schema 'template' is only used with kind 'format' (chat uses the "
                           "tokenizer's chat template)")

    @classmethod
    def from_spec(cls, spec, chat_template_kwargs: dict | None = None) -> "PromptSchema":
        """"chat", a format string, a dict {kind, template, system, chat_template_kwargs}, or a PromptSchema.

        `chat_template_kwargs` (the task's) applies to a chat schema that does not set its own; a
        dict spec's own key replaces it whole ({} renders without any)."""
        if isinstance(spec, PromptSchema):
            return spec
        if isinstance(spec, str):
            spec = {"kind": "chat"} if spec == "chat" else {"kind": "format", "template": spec}
        if not isinstance(spec, dict):
            raise OpdError(f"prompt schema must be a string or a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(FIELDS), key=str)
        if unknown:
            raise OpdError(f"prompt schema: unknown keys {', '.join(map(str, unknown))} (valid: {', '.join(FIELDS)})")
        if spec.get("kind", cls.kind) == "chat" and "chat_template_kwargs" not in spec:
            spec = {**spec, "chat_template_kwargs": chat_template_kwargs or {}}
        return cls(**spec)

    def render(self, example: Example, tokenizer=None) -> str:
        """The prompt text for `example` (deterministic; identical for teacher and student)."""
        if self.kind == "chat":
            return self._render_chat(example, tokenizer)
        fields = {**example.extra, "prompt": example.prompt}
        try:
            return self.template.format_map(fields)
        except KeyError as exc:
            raise OpdError(f"prompt template {self.template!r} uses field {exc.args[0]!r}, which the "
                           f"example does not have (fields: {', '.join(sorted(fields))})") from exc
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise OpdError(f"prompt template {self.template!r} cannot render an example: {exc}") from exc

    def _render_chat(self, example: Example, tokenizer) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise OpdError("prompt schema 'chat' needs a tokenizer with a chat template; this one "
                           "has none (use a format string such as '{prompt}')")
        try:
            text = tokenizer.apply_chat_template(self.messages(example.prompt), tokenize=False,
                                                 add_generation_prompt=True, **self.chat_template_kwargs)
        except Exception as exc:  # a user-supplied Jinja template may raise anything
            msg = " ".join(str(exc).split())
            raise OpdError(f"chat template failed to render: {type(exc).__name__}: {msg}") from exc
        if not isinstance(text, str):
            raise OpdError(f"chat template rendered {type(text).__name__}, expected text")
        return text

    def messages(self, prompt: str, reply: str | None = None) -> list[dict]:
        """The chat turns of a prompt (and of the assistant's reply, when given)."""
        turns = [{"role": "system", "content": self.system}] if self.system is not None else []
        turns.append({"role": "user", "content": prompt})
        if reply is not None:
            turns.append({"role": "assistant", "content": reply})
        return turns

    def describe(self) -> dict:
        """The schema's fields, for the run manifest. Empty chat_template_kwargs are left out, so a
        schema without them keeps the hash it had before the field existed."""
        fields = asdict(self)
        if not fields["chat_template_kwargs"]:
            del fields["chat_template_kwargs"]
        return fields

    def schema_hash(self) -> str:
        """First 16 hex chars of sha256 over the canonical JSON of the fields."""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _check_kwargs(kwargs) -> None:
    """A mapping of string keys to JSON values (they are hashed), none of them one opd sets itself."""
    if not isinstance(kwargs, dict):
        raise OpdError(f"prompt schema chat_template_kwargs must be a mapping, got {kwargs!r}")
    bad = sorted((k for k in kwargs if not isinstance(k, str) or k in RESERVED_KWARGS), key=str)
    if bad:
        raise OpdError(f"prompt schema chat_template_kwargs cannot set {', '.join(map(repr, bad))} "
                       "(opd renders the prompt as text with add_generation_prompt=True)")
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise OpdError(f"prompt schema chat_template_kwargs must hold plain values (strings, numbers, "
                       f"booleans, lists, mappings): {exc}") from exc


def _check_template(template: str) -> None:
    """Reject templates without {prompt}, with positional fields, or with bad brace syntax."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise OpdError(f"prompt template {template!r} is not a valid format string ({exc})") from exc
    names = [re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in parsed if name is not None]
    if any(n == "" or n.isdigit() for n in names):
        raise OpdError(f"prompt template {template!r} has a positional field; name it, e.g. {{prompt}}")
    if "prompt" not in names:
        raise OpdError(f"prompt template {template!r} must contain {{prompt}}")
