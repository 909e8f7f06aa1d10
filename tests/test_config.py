"""The typed config: documented defaults, YAML files and --set overrides, and one-line errors."""

import pytest
import yaml

from opd.config import DistillConfig, load_config, save_config, to_dict
from opd.errors import OpdError

REQUIRED = ["teacher.model=t", "student.model=s", "task.builtin=addition"]


def test_defaults_are_the_documented_ones():
    cfg = load_config(None, REQUIRED)
    assert cfg.objective.name == "auto"
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.samples_per_prompt == 1
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 300
    assert cfg.task.verifier == "exact" and cfg.task.prompt_schema == "{prompt}"


def test_every_default_is_documented_inline():
    import inspect

    import opd.config as module

    source = inspect.getsource(module)
    for section, fields in to_dict(DistillConfig()).items():
        if not isinstance(fields, dict):
            continue
        for name in fields:
            line = next(l for l in source.splitlines() if l.strip().startswith(f"{name}:"))
            assert "#" in line or name in ("weight_decay",), f"{section}.{name} has no inline doc"


def test_yaml_then_set_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "t"}, "student": {"model": "s"},
                                    "task": {"train": "a.jsonl", "eval": "b.jsonl"},
                                    "train": {"steps": 50, "lr": "1e-3"}, "out": "runs/x"}))
    cfg = load_config(path, ["train.steps=7", "objective.name=jsd", "objective.beta=0.3", "task.params={digits: 2}"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3
    assert cfg.objective.name == "jsd" and cfg.objective.beta == 0.3
    assert cfg.task.params == {"digits": 2}
    assert cfg.out == "runs/x"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, REQUIRED + ["train.seed=5"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("train.steps=ten", "train.steps: expected int"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.lr=fast", "train.lr: expected float"),
    ("train.steps=0", "train.steps must be positive"),
    ("rollout.batch_size=-1", "rollout.batch_size must be positive"),
    ("rollout.temperature=0", "rollout.temperature must be positive"),
    ("train=3", "train: expected a mapping"),
    ("noequals", "--set expects key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(OpdError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, REQUIRED + [override])


def test_missing_required_parts():
    with pytest.raises(OpdError, match="teacher.model is required"):
        load_config(None, ["student.model=s", "task.builtin=x"])
    with pytest.raises(OpdError, match="task needs either"):
        load_config(None, ["teacher.model=t", "student.model=s"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  model: t\nstudent: [unclosed\n")
    with pytest.raises(OpdError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(OpdError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
