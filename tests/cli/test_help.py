"""`opd <cmd> --help` documents every option with its default, and `opd config` prints the documented config."""

import argparse
import dataclasses
import typing

import pytest
import yaml

from opd.cli.config_doc import config_yaml, field_docs
from opd.cli.main import build_parser, main
from opd.config import DistillConfig, to_dict
from opd.tasks.builtin import BUILTIN_TASKS


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"opd": parser, **sub.choices}


@pytest.mark.parametrize("name", list(subcommands()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = subcommands()[name]
    text = " ".join(parser.format_help().split())  # argparse wraps lines; compare on single spaces
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help, f"opd {name} {label}: no help text"
        if not action.option_strings or action.nargs == 0:
            continue  # positionals and flags (on when given) have no default to show
        if action.required:
            assert f"{action.help} (required)" in text, f"opd {name} {label} does not say it is required"
        elif action.default is not None:
            shown = "none" if action.default == "" else str(action.default)
            assert f"(default: {shown})" in text, f"opd {name} {label}: default {action.default!r} not shown"


def test_distill_help_points_to_the_config_reference_and_data_lists_the_tasks():
    commands = subcommands()
    distill = commands["distill"].format_help()
    assert "opd config" in distill and "opd/config.py" in distill
    data = commands["data"].format_help()
    for name, family in BUILTIN_TASKS.items():
        assert name in data and family.description in data


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as done:
        main(["sft", "--help"])
    assert done.value.code == 0 and "(default: 0.001)" in " ".join(capsys.readouterr().out.split())


# -- opd config ---------------------------------------------------------------------------------------
def test_config_prints_the_defaults_with_their_comments(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == to_dict(DistillConfig())
    lr = next(line for line in out.splitlines() if line.strip().startswith("lr:"))
    assert lr.startswith("  lr: 0.001") and "# AdamW learning rate" in lr  # nested under train:, its comment inline
    # a comment block above a field is kept above it
    assert "# several teachers routed by task tag" in out.split("teachers: null")[0].splitlines()[-2]


def test_config_resolves_a_file_and_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "t"}, "student": {"model": "s"},
                                    "task": {"builtin": "running_sum"}, "train": {"steps": 7}}))
    assert main(["config", str(path), "--set", "train.lr=3e-4", "--set", "filters=[{rule: min_tokens, n: 1}]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 7 and resolved["train"]["lr"] == 3e-4
    assert resolved["filters"] == [{"rule": "min_tokens", "n": 1}] and resolved["task"]["builtin"] == "running_sum"
    assert main(["config", str(path), "--set", "train.stepz=1"]) == 2  # validated as distill would
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


# Stand-ins for config classes that do not exist yet: a section whose class is chosen at run time
# and a subclass that adds a field; config_yaml must document them from their own source.
@dataclasses.dataclass
class Fast:
    speed: int = 3  # how fast


@dataclasses.dataclass
class Faster(Fast):
    # a block comment
    # over two lines
    boost: float = 1.5  # extra


@dataclasses.dataclass
class Root:
    name: str = "x"  # the name
    section: typing.Any = dataclasses.field(default_factory=Fast)  # chosen at run time
    items: list = dataclasses.field(default_factory=lambda: [Fast(1)])


def test_config_yaml_is_generic_over_nested_and_runtime_chosen_dataclasses():
    assert field_docs(Faster)["speed"].inline == "how fast"  # inherited
    assert field_docs(Faster)["boost"].above == ["a block comment", "over two lines"]
    text = config_yaml(Root(section=Faster()))
    assert yaml.safe_load(text) == {"name": "x", "section": {"speed": 3, "boost": 1.5}, "items": [{"speed": 1}]}
    lines = text.splitlines()
    assert lines[0].startswith("name: x") and lines[0].endswith("# the name")
    assert lines[1].startswith("section:") and lines[1].endswith("# chosen at run time")
    assert lines[2].startswith("  speed: 3") and lines[2].endswith("# how fast")
    assert lines[3:5] == ["  # a block comment", "  # over two lines"]
    assert lines[5].startswith("  boost: 1.5") and lines[5].endswith("# extra")
