"""`opd distill` with the settings real hardware needs, end to end: a LoRA student and bfloat16 weights
train, checkpoint and resume exactly; a LoRA run writes the adapter and the merged model."""

import json

import pytest
import torch

from opd import loop
from opd.backends.hf import load_model, weights_sha256
from opd.backends.weights import safetensors_files, stored_dtype
from opd.store.rundir import RunDir
from tests.test_loop import config, crash_at_update, task_and_models  # noqa: F401  (module fixture)

VARIANTS = {"lora": ["student.lora.r=8", "train.lr=1e-2"],
            "bf16-weights": ["train.precision=bfloat16_weights", "train.micro_batch_tokens=64"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_crash_and_resume_equals_a_straight_run(task_and_models, monkeypatch, variant):  # noqa: F811
    root, paths, dirs = task_and_models
    extra = [*VARIANTS[variant], "train.steps=10", "train.eval_every=5", "train.checkpoint_every=5", "eval.limit=64"]
    straight = loop.distill(config(root, paths, dirs, f"out={root / f'{variant}-straight'}", *extra), progress=False)
    cfg = config(root, paths, dirs, f"out={root / f'{variant}-crash'}", *extra)
    crash_at_update(monkeypatch, 8, cfg)  # after the step-5 checkpoint
    resumed = loop.distill(cfg, resume=True, progress=False)

    a, b = (load_model(str(root / f"{variant}-{kind}" / "student")).model for kind in ("straight", "crash"))
    assert weights_sha256(a) == weights_sha256(b)
    assert resumed["student_accuracy_after"] == straight["student_accuracy_after"]
    metrics = [json.loads(line) for line in (root / f"{variant}-crash" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    kl = [m["reverse_kl"] for m in metrics]
    # every update applied and the student moved (10 noisy steps are too few to demand a lower KL)
    assert all(torch.isfinite(torch.tensor(kl))) and all(m["update_applied"] for m in metrics)
    assert weights_sha256(a) != weights_sha256(load_model(str(dirs["student"])).model)
    manifest = json.loads((root / f"{variant}-straight" / "manifest.json").read_text())
    ckpt = RunDir(root / f"{variant}-crash").latest_checkpoint()[1]
    if variant == "lora":
        assert manifest["student"]["lora"]["r"] == 8
        assert 0 < manifest["student"]["trainable_params"] < manifest["student"]["num_params"] / 3
        assert RunDir.is_adapter_checkpoint(ckpt)
        assert (root / "lora-straight" / "student-adapter" / "adapter_config.json").exists()
        assert a.dtype == torch.float32 and not any("lora" in n for n, _ in a.named_parameters())  # merged
    else:
        assert manifest["student"]["train_precision"] == "bfloat16_weights"
        assert stored_dtype(safetensors_files(root / "bf16-weights-straight" / "student")) == "bfloat16"
        assert not RunDir.is_adapter_checkpoint(ckpt)
