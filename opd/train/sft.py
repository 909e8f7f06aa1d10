"""Supervised fine-tuning on prompt -> answer: loss on answer tokens and EOS only.

Used to make teachers from scratch, to warm up an ignorant student, and (with teacher traces as
answers) as the off-policy baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from opd.rollout.prompts import encode_answers, encode_prompts
from opd.batch import Batch, completion_logits, make_sft_batch  # noqa: F401  (make_sft_batch: re-exported)
from opd.train.optim import make_optimizer, optimizer_step


def sft_loss(model, batch: Batch, normalizer: float | None = None) -> torch.Tensor:
    """Token cross-entropy on completion positions only (prompt and padding never enter)."""
    logits = completion_logits(model, batch).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.completion_ids, reduction="none")
    mask = batch.completion_mask.to(nll.dtype)
    return (nll * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))


@dataclass
class SftResult:
    steps: int
    final_loss: float
    losses: list[float]
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy) when eval_fn is given


def run_sft(model, tokenizer, examples, schema, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
            warmup_steps: int = 100, weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0,
            progress: bool = True, desc: str = "sft", eval_fn=None, eval_every: int = 0,
            stop_at: float | None = None) -> SftResult:
    """Train `model` in place for up to `steps` steps on random batches of `examples`.

    With `eval_fn(model) -> accuracy` and `eval_every`, evaluates on that schedule and stops early
    once accuracy reaches `stop_at` (how the comparison's deliberately imperfect teacher is made).
    """
    from tqdm.auto import tqdm

    prompts = encode_prompts(examples, schema, tokenizer)
    answers = encode_answers(examples, tokenizer)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    model.requires_grad_(True)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, warmup_steps)
    losses, evals = [], []
    # counted after each finished step, so the bar ends at N/N (or at the step --stop-at stopped at)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for step in range(1, steps + 1):
        idx = [rng.randrange(len(examples)) for _ in range(batch_size)]
        batch = make_sft_batch([prompts[i] for i in idx], [answers[i] for i in idx], tokenizer.pad_token_id)
        loss = sft_loss(model, batch)
        loss.backward()
        optimizer_step(model, optimizer, scheduler, grad_clip)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update(1)
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == steps):
            evals.append((step, eval_fn(model)))
            model.train()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", eval=f"{evals[-1][1]:.3f}")
            if stop_at is not None and evals[-1][1] >= stop_at:
                break
    bar.close()
    model.eval()
    return SftResult(steps=len(losses), final_loss=losses[-1] if losses else float("nan"), losses=losses, evals=evals)
