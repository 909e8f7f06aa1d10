"""Running out of GPU memory ends in one line naming the setting to lower, the phase's own first."""

import pytest
import torch

from opd.batch import make_sft_batch
from opd.cli.main import build_parser, execute, oom_message
from opd.rollout.sampler import generate
from opd.teachers.local import teacher_hidden
from opd.train.sft import sft_backward

MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which ..."


class OutOfMemory(torch.nn.Module):
    """A model whose every forward pass runs out of GPU memory."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **kwargs):
        raise torch.OutOfMemoryError(MESSAGE)


def raised(fn, *args, **kwargs) -> torch.OutOfMemoryError:
    with pytest.raises(torch.OutOfMemoryError) as exc:
        fn(*args, **kwargs)
    return exc.value


BATCH = make_sft_batch([[1, 5], [1, 6, 7]], [[8, 2], [9, 2]], pad_id=0)


@pytest.mark.parametrize("phase, call, first", [
    ("in the training update", lambda: raised(sft_backward, OutOfMemory(), BATCH), "train.micro_batch_tokens"),
    ("while decoding", lambda: raised(generate, OutOfMemory(), [[1, 5]], eos_id=2, pad_id=0, max_new_tokens=2,
                                      greedy=True, fast=False), "rollout.kv_cache_gib"),
    ("in teacher scoring", lambda: raised(teacher_hidden, OutOfMemory(), BATCH), "teacher.device"),
])
def test_the_phase_is_read_from_the_traceback_and_its_setting_comes_first(phase, call, first):
    line = oom_message(call())
    assert line.startswith(f"CUDA out of memory {phase} (tried to allocate 2.00 GiB): ")
    assert first in line.split(": ", 1)[1].split(";")[0] and "\n" not in line
    for setting in ("train.micro_batch_tokens", "rollout.kv_cache_gib", "train.gradient_checkpointing: true",
                    "student.lora.r", "teacher.device / teacher.device_map"):
        assert setting in line


def test_without_a_known_phase_every_setting_is_named_and_flag_commands_name_their_flags():
    exc = torch.OutOfMemoryError(MESSAGE)  # raised nowhere in opd
    line = oom_message(exc)
    assert line.startswith("CUDA out of memory (tried to allocate 2.00 GiB): lower train.micro_batch_tokens")
    assert oom_message(exc, "eval") == ("CUDA out of memory (tried to allocate 2.00 GiB): lower --batch-size "
                                        "(prompts per decoding batch)")
    assert "--logits-chunk" in oom_message(exc, "serve-teacher")


def parsed(*argv):
    return build_parser().parse_args(list(argv))


def out_of_memory(args):
    raise torch.OutOfMemoryError(MESSAGE)


def shape_mismatch(args):
    raise RuntimeError("shape mismatch")


def test_the_cli_prints_one_line_and_exits_2_and_debug_keeps_the_traceback(capsys):
    args = parsed("distill", "run.yaml")
    args.func = out_of_memory
    assert execute(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("opd: error: CUDA out of memory (tried to allocate 2.00 GiB): ") and err.count("\n") == 1
    args = parsed("--debug", "distill", "run.yaml")
    args.func = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        execute(args)


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    args = parsed("distill", "run.yaml")
    args.func = shape_mismatch
    with pytest.raises(RuntimeError, match="shape mismatch"):
        execute(args)
