"""`opd config [CONFIG.yaml] [--set k=v]`: the resolved config as YAML, each key with its comment from opd/config.py.

Nothing here names a config key: the dataclasses are walked as they are, and each field's comments
are read from its class's source (the trailing `# ...` on the field's line, and a block of comment
lines right above it). A field whose value is a dataclass instance is printed as a nested section,
documented by that instance's own class, so a section whose type is chosen at run time works too.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize

import yaml

COMMENT_COLUMN = 36  # inline comments line up here unless the key and value are longer
INDENT = "  "


@dataclasses.dataclass
class FieldDoc:
    above: list[str]  # comment lines right above the field
    inline: str  # the comment at the end of the field's line(s)


@functools.cache
def field_docs(cls: type) -> dict[str, FieldDoc]:
    """name -> FieldDoc for the annotated fields of `cls` and its dataclass bases (own comments win)."""
    docs: dict[str, FieldDoc] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def _own_docs(cls: type) -> dict[str, FieldDoc]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (built at run time, frozen app): keys without comments
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1  # 1-based line numbers; lines[line - 1] is the line above
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        docs[node.target.id] = FieldDoc(above, comments.get(node.end_lineno, ""))
    return docs


def _plain(value):
    """Dataclasses (e.g. inside a list), tuples and paths as the plain data YAML writes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _scalar(value) -> str:
    """A value as one line of YAML (flow style for lists and mappings)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text.removesuffix("...").strip()


def config_yaml(cfg) -> str:
    """The config as YAML text with every key's comments; yaml.safe_load of it gives dataclasses.asdict(cfg)."""
    return "\n".join(_lines(cfg, 0)) + "\n"


def _lines(obj, depth: int) -> list[str]:
    docs, pad, out = field_docs(type(obj)), INDENT * depth, []
    for f in dataclasses.fields(obj):
        value, doc = getattr(obj, f.name), docs.get(f.name, FieldDoc([], ""))
        out += [f"{pad}# {line}" if line else f"{pad}#" for line in doc.above]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.append(_with_comment(f"{pad}{f.name}:", doc.inline))
            out += _lines(value, depth + 1)
        else:
            out.append(_with_comment(f"{pad}{f.name}: {_scalar(value)}", doc.inline))
    return out


def _with_comment(text: str, comment: str) -> str:
    return f"{text.ljust(COMMENT_COLUMN)}  # {comment}" if comment else text


def resolve(path: str | None, overrides: list[str]):
    """CONFIG.yaml + --set, validated as `opd distill` would; without a file, the defaults plus --set, unvalidated
    (so `opd config --set train.lr=1e-4` works without a teacher and a student)."""
    from opd import config

    if path is not None:
        return config.load_config(path, overrides)
    data: dict = {}
    for assignment in overrides:
        config.apply_override(data, assignment)
    return config.from_dict(config.DistillConfig, data)


def print_config(path: str | None, overrides: list[str]) -> None:
    print(config_yaml(resolve(path, overrides)), end="")
