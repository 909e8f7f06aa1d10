"""SFT: loss only on answer tokens + EOS, and it really learns a small task."""

import random
from dataclasses import dataclass, field

import pytest

from opd.backends.hf import init_model, load_model
from opd.eval.evaluate import evaluate
from opd.train.sft import make_sft_batch, run_sft, sft_backward


@dataclass(frozen=True)
class Ex:
    prompt: str
    answer: str
    tag: str = "default"
    extra: dict = field(default_factory=dict)


class PlainSchema:
    kind = "format"

    def render(self, ex, tokenizer=None):
        return ex.prompt


def exact(completion, answer):
    return completion.strip() == answer.strip()


def reverse_task(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))
        out.append(Ex(prompt=s + "=", answer=s[::-1]))
    return out


def test_sft_loss_ignores_prompt_and_padding(tiny):
    pad = tiny.tokenizer.pad_token_id
    batch = make_sft_batch([[1, 5, 6, 7], [1, 8]], [[9, 2], [10, 11, 2]], pad)
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    base = sft_backward(tiny.model, batch)
    # Changing what sits in padding slots (never attended, never a target) changes nothing.
    batch.completion_ids[0, 2] = 7
    batch.prompt_ids[1, 0] = 9
    assert sft_backward(tiny.model, batch) == pytest.approx(base, rel=1e-6)
    # Changing a target token does change the loss.
    batch.completion_ids[0, 0] = 10
    assert sft_backward(tiny.model, batch) != pytest.approx(base, rel=1e-3)


def test_sft_really_learns_string_reversal(tmp_path):
    train, held_out = reverse_task(2000, 0), reverse_task(100, 1)
    out = init_model("qwen3", layers=2, hidden=64, heads=4, tokenizer_texts=["abc="], out=tmp_path / "m", seed=0)
    m = load_model(str(out), trainable=True)
    before = evaluate(m.model, m.tokenizer, held_out, PlainSchema(), exact, max_new_tokens=6).accuracy
    result = run_sft(m.model, m.tokenizer, train, PlainSchema(), steps=200, batch_size=32, lr=3e-3,
                     warmup_steps=20, progress=False)
    after = evaluate(m.model, m.tokenizer, held_out, PlainSchema(), exact, max_new_tokens=6).accuracy
    assert before < 0.2
    assert after > 0.9
    assert result.losses[-1] < result.losses[0] / 5
