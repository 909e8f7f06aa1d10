"""Where models run and how they load: devices resolved once, tensors moved at model boundaries,
weights loaded in their target dtype, the manifest's hash taken from the files."""

import hashlib

import pytest
import torch

from opd.backends.devices import native_bf16, resolve_device
from opd.backends.hf import load_model
from opd.backends.weights import files_sha256, safetensors_files, stored_dtype
from opd.batch import Batch
from opd.config import load_config
from opd.errors import OpdError
from opd.run import load_student
from opd.scores import TeacherScores

BASE = ["teacher.model=t", "task.builtin=x"]


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(OpdError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    assert not native_bf16("meta")


def test_config_refuses_a_device_it_cannot_name():
    with pytest.raises(OpdError, match="teacher.device must be auto, cpu, cuda or cuda:N"):
        load_config(None, [*BASE, "student.model=s", "teacher.device=gpu0"])


def test_a_batch_moves_whole_and_scores_index_across_devices():
    """A batch lives on the CPU and moves once into a model; a teacher's hidden states stay on its own
    device while masks and log-probs are on the CPU (meta stands in for a GPU)."""
    batch = Batch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                  torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
                  torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool))
    moved = batch.to("meta")
    assert all(getattr(moved, f).device.type == "meta" for f in ("prompt_ids", "completion_mask", "truncated"))
    scores = TeacherScores(torch.zeros(2, 4), [torch.zeros(2, 4, 8, device="meta")], [lambda h: h],
                           torch.zeros(2, dtype=torch.long))
    kept = scores.rows(torch.tensor([1]))  # a CPU index into meta hidden states and CPU log-probs
    assert kept.hidden[0].shape == (1, 4, 8) and kept.hidden[0].device.type == "meta"
    assert kept.logprobs.device.type == "cpu" and kept.owner.device.type == "cpu"


def test_a_16_bit_model_loads_in_16_bits_and_is_hashed_from_its_files(tiny_model_dir, tmp_path):
    bf16_dir = tmp_path / "bf16"
    load_model(str(tiny_model_dir)).model.to(torch.bfloat16).save_pretrained(bf16_dir)
    load_model(str(tiny_model_dir)).tokenizer.save_pretrained(bf16_dir)
    files = safetensors_files(bf16_dir)
    assert stored_dtype(files) == "bfloat16" and stored_dtype(safetensors_files(tiny_model_dir)) == "float32"
    loaded = load_model(str(bf16_dir), dtype="auto")
    assert loaded.stored_dtype == "bfloat16"
    assert loaded.model.dtype == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    # the hash is of the files as stored, streamed: names and bytes in name order
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    assert loaded.weights_hash == h.hexdigest() == files_sha256(files, block=7)
    assert load_model(str(tiny_model_dir), dtype="auto").model.dtype == torch.float32  # stored float32


def test_the_student_loads_as_train_precision_and_lora_ask(tiny_model_dir):
    model = str(tiny_model_dir)
    cfg = load_config(None, [*BASE, f"student.model={model}", "student.device=cpu",
                             "train.precision=bfloat16_weights", "train.gradient_checkpointing=true"])
    student = load_student(cfg)
    assert {p.dtype for p in student.model.parameters()} == {torch.bfloat16}
    assert getattr(student.model, "is_activation_checkpointing", None) or student.model.is_gradient_checkpointing
    assert load_student(load_config(None, [*BASE, f"student.model={model}"])).model.dtype == torch.float32  # auto, CPU
    lora = load_student(load_config(None, [*BASE, f"student.model={model}", "student.lora.r=4"]))
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
