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
from dataclasses import asdict, dataclass

from opd.errors import OpdError
from opd.tasks.data import Example

KINDS = ("format", "chat")
DEFAULT_TEMPLATE = "{prompt}"


@dataclass(frozen=True)
class PromptSchema:
    """`format`: a Python format string over the prompt and extra fields; `chat`: the tokenizer's
    chat template with an optional system message and the prompt as the user turn."""

    kind: str = "format"
    template: str = DEFAULT_TEMPLATE
    system: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise OpdError(f"prompt schema kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.template, str):
            raise OpdError(f"prompt schema template must be a string, got {self.template!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise OpdError(f"prompt schema system must be a string, got {self.system!r}")
        if self.kind == "format":
            if self.system is not None:
                raise OpdError("prompt schema 'system' is only used with kind 'chat'")
            _check_template(self.template)
        elif self.template != DEFAULT_TEMPLATE:
            raise OpdError("prompt schema 'template' is only used with kind 'format' (chat uses the "
                           "tokenizer's chat template)")

    @classmethod
    def from_spec(cls, spec) -> "PromptSchema":
        """"chat", a format string, a dict {kind, template, system}, or a PromptSchema."""
        if isinstance(spec, PromptSchema):
            return spec
        if isinstance(spec, str):
            return cls(kind="chat") if spec == "chat" else cls(kind="format", template=spec)
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"kind", "template", "system"})
            if unknown:
                raise OpdError(f"prompt schema: unknown keys {', '.join(map(str, unknown))} "
                               "(valid: kind, template, system)")
            return cls(**spec)
        raise OpdError(f"prompt schema must be a string or a mapping, got {type(spec).__name__}")

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
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages.append({"role": "user", "content": example.prompt})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a user-supplied Jinja template may raise anything
            msg = " ".join(str(exc).split())
            raise OpdError(f"chat template failed to render: {type(exc).__name__}: {msg}") from exc
        if not isinstance(text, str):
            raise OpdError(f"chat template rendered {type(text).__name__}, expected text")
        return text

    def describe(self) -> dict:
        """The schema's fields, for the run manifest."""
        return asdict(self)

    def schema_hash(self) -> str:
        """First 16 hex chars of sha256 over the canonical JSON of the fields."""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


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
