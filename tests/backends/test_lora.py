"""LoRA students (opd/backends/lora.py): only adapters train, rollouts follow the adapter on the lean
and the HF decode, split_lm sees the adapter, and the adapter / merged model save and reload."""

import sys

import pytest
import torch

from opd.backends.hf import load_model
from opd.backends.lora import apply_lora, is_peft, load_adapter, save_student, unwrap
from opd.config import LoraConfig, load_config
from opd.errors import OpdError
from opd.methods import make_method, method_class
from opd.objectives.select import make_objective
from opd.rollout.fast_decode import supports
from opd.rollout.sampler import generate
from opd.store.rundir import RunDir, load_tokenizer
from opd.teachers.local import score as teacher_scores
from opd.train.chunked import split_lm
from opd.train.optim import make_optimizer
from opd.train.step import update

peft = pytest.importorskip("peft")

PROMPTS = ["1+2=", "123+45=", "9=", "abc", "7+7=", "0=", "55+5=", "cab="]


def lora_student(loaded, seed=1, r=4):
    """`loaded`'s model with LoRA on every linear layer and a non-zero adapter (B = 0 at init is a no-op)."""
    model = apply_lora(loaded.model, LoraConfig(r=r, alpha=2 * r))
    set_adapter_weights(model, seed)
    return model


@torch.no_grad()
def set_adapter_weights(model, seed, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def lora_params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_params(model) -> dict:
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if "lora_" not in n}


def rollouts(model, tok, uniforms, fast=True):
    ids = [tok(p).input_ids for p in PROMPTS]
    return generate(model, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=12,
                    uniforms=uniforms, fast=fast)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])


def test_only_the_adapters_change_in_an_update(tiny_model_dir):
    student, teacher = load_model(str(tiny_model_dir), trainable=True), load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = lora_student(student)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cfg = load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x"])
    tok = student.tokenizer
    batch = rollouts(model, tok, torch.rand(len(PROMPTS), 12, generator=torch.Generator().manual_seed(0)))
    opt, sched = make_optimizer(model, lr=1e-2, weight_decay=0.1)  # decay would move any param it holds
    base, adapters = base_params(model), lora_params(model)
    stats = update(model, opt, sched, make_method(method_class("opd").Options()), make_objective(cfg.objective),
                   batch, cfg.train, scores=teacher_scores(teacher.model, batch))
    assert stats["update_applied"]
    after = base_params(model)
    assert all(torch.equal(base[n], after[n]) for n in base)  # bit-identical
    changed = {n for n, p in lora_params(model).items() if not torch.equal(adapters[n], p)}
    assert changed == set(adapters)


def test_rollouts_follow_the_adapter_and_the_lean_path_matches_hf(tiny):
    tok = tiny.tokenizer
    uniforms = torch.rand(len(PROMPTS), 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = rollouts(tiny.model, tok, uniforms)
    model = apply_lora(tiny.model, LoraConfig(r=4, alpha=8))
    assert supports(model)  # the lean decode takes the PeftModel, not the HF fallback
    assert torch.equal(rollouts(model, tok, uniforms).completion_ids, plain.completion_ids)  # B = 0: a no-op
    set_adapter_weights(model, seed=1)
    adapted = rollouts(model, tok, uniforms)
    assert not torch.equal(adapted.completion_ids, plain.completion_ids)
    set_adapter_weights(model, seed=2)
    assert not torch.equal(rollouts(model, tok, uniforms).completion_ids, adapted.completion_ids)
    _assert_same_rollouts(rollouts(model, tok, uniforms), rollouts(model, tok, uniforms, fast=False))


def test_the_lean_path_follows_merged_and_disabled_adapters(tiny):
    tok = tiny.tokenizer
    uniforms = torch.rand(len(PROMPTS), 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = lora_student(tiny)
    unmerged = rollouts(model, tok, uniforms, fast=False)
    model.merge_adapter()
    _assert_same_rollouts(rollouts(model, tok, uniforms), unmerged)
    with model.disable_adapter():  # merged and disabled: the lean weights subtract the merged delta
        off = rollouts(model, tok, uniforms)
        _assert_same_rollouts(off, rollouts(model, tok, uniforms, fast=False))
    assert not torch.equal(off.completion_ids, unmerged.completion_ids)


def _assert_same_rollouts(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    torch.testing.assert_close(a.sample_logprobs, b.sample_logprobs, atol=1e-4, rtol=0)


def test_split_lm_on_a_peft_model_keeps_the_adapter(tiny):
    model = lora_student(tiny)
    model.eval()
    body, head = split_lm(model)
    assert body is unwrap(model).model  # the body, not the whole causal LM a PeftModel's `.model` gives
    with torch.no_grad():
        split = head(body(input_ids=IDS).last_hidden_state)
        with model.disable_adapter():
            without = logits(model, IDS)
    torch.testing.assert_close(split, logits(model, IDS), atol=1e-5, rtol=1e-5)
    assert (split - without).abs().max() > 1e-2  # the adapter is active in the split


def test_saved_adapter_and_merged_model_reload_to_the_trained_student(tiny, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lora_student(tiny)
    model.eval()
    expected, base, adapters = logits(model, IDS), base_params(model), lora_params(model)
    save_student(model, tiny.tokenizer, tmp_path / "student", tmp_path / "student-adapter")
    # the live model is untouched: still unmerged, same weights
    assert is_peft(model) and not any(getattr(m, "merged", False) for m in model.modules())
    assert all(torch.equal(base[n], p) for n, p in base_params(model).items())
    assert all(torch.equal(adapters[n], p) for n, p in lora_params(model).items())

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, IDS), expected, atol=1e-5, rtol=1e-5)
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                              tmp_path / "student-adapter")
    torch.testing.assert_close(logits(reloaded, IDS), expected, atol=1e-6, rtol=1e-6)
    for folder in ("student", "student-adapter"):
        assert AutoTokenizer.from_pretrained(tmp_path / folder).get_vocab() == tiny.tokenizer.get_vocab()


def test_a_plain_student_saves_as_itself(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    save_student(tiny.model, tiny.tokenizer, tmp_path / "student", None)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "student"), IDS),
                               logits(tiny.model, IDS))


def test_a_checkpoint_holds_only_the_adapter_and_resumes_it(tiny, tiny_model_dir, tmp_path):
    model = lora_student(tiny)
    run = RunDir(tmp_path / "run")
    run.create(resume=False)
    ckpt = run.save_checkpoint(3, model, tiny.tokenizer, {"step": 3}, keep=2)
    assert run.latest_checkpoint() == (3, ckpt) and run.is_adapter_checkpoint(ckpt)
    assert not (ckpt / "model.safetensors").exists()
    adapter_bytes = (ckpt / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tiny_model_dir / "model.safetensors").stat().st_size / 2
    assert load_tokenizer(run.root).get_vocab() == tiny.tokenizer.get_vocab()

    resumed = load_adapter(load_model(str(tiny_model_dir), trainable=True).model, ckpt)
    saved = lora_params(model)
    assert all(torch.equal(saved[n], p) for n, p in lora_params(resumed).items())
    # the optimizer's state is positional: the resumed trainable parameters come in the same order
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == list(saved)
    model.eval()
    resumed.eval()
    torch.testing.assert_close(logits(resumed, IDS), logits(model, IDS), atol=0, rtol=0)


def test_without_peft_a_lora_student_is_a_one_line_error(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(OpdError, match=r"pip install 'opd\[lora\]'"):
        apply_lora(tiny.model, LoraConfig(r=4))


def test_lora_on_a_tied_embedding_is_refused(tiny):
    with pytest.raises(OpdError, match="tied"):
        apply_lora(tiny.model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
