"""Building a run: the rollout backend `rollout.backend` names, or a one-line error."""

from types import SimpleNamespace

import pytest

from opd.config import load_config
from opd.errors import OpdError
from opd.rollout.backend import HFBackend
from opd.run import make_backend

BASE = ["teacher.model=t", "student.model=s", "task.builtin=x"]


class Tokenizer(SimpleNamespace):
    def __len__(self):
        return 10


def student():
    return SimpleNamespace(model=object(), name="s", tokenizer=Tokenizer(eos_token_id=2, pad_token_id=0))


def test_auto_is_the_in_process_sampler():
    assert isinstance(make_backend(load_config(None, BASE), student()), HFBackend)


def test_an_unavailable_backend_is_one_line():
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(OpdError, match="vllm") as exc:
        make_backend(load_config(None, BASE + ["rollout.backend=vllm"]), student())
    assert "\n" not in str(exc.value)


def test_ray_backend_needs_workers():
    with pytest.raises(OpdError, match="scale.rollout_workers"):
        load_config(None, BASE + ["rollout.backend=ray"])
    with pytest.raises(OpdError, match="rollout.backend must be"):
        load_config(None, BASE + ["rollout.backend=tpu"])
