"""Supervised fine-tuning on prompt -> answer: loss on answer tokens and EOS only.

Used to make teachers from scratch, to warm up an ignorant student, and (with teacher traces as
answers) as the off-policy baseline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from opd.rollout.prompts import encode_answers, encode_prompts
from opd.batch import Batch, make_sft_batch
from opd.train.chunked import DEFAULT_CHUNK_ELEMENTS, chunk_ranges, completion_hidden, split_lm
from opd.train.optim import make_optimizer, optimizer_step


def sft_backward(model, batch: Batch, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> float:
    """Backpropagate the token cross-entropy on completion positions (prompt and padding never enter),
    averaged over those tokens, into `model`; returns its value.

    As in opd/train/step.py: the body runs once, then the head, the loss and its backward per chunk
    of at most `chunk_elements` logits, each chunk's gradient handed back to the body through a
    detached leaf, so the peak holds one chunk's logits, never [B, T, V]. The loss is a sum over
    tokens divided by their count, so chunking changes neither the loss nor the gradient."""
    _, head = split_lm(model)
    sel = batch.completion_mask.bool()
    n_tokens = max(int(sel.sum()), 1)
    hidden = completion_hidden(model, batch)[sel]  # [n, H] (or [n, V] logits without a head split)
    leaf = hidden.detach().requires_grad_()
    ids = batch.completion_ids[sel]
    total = torch.zeros((), device=leaf.device)  # summed on the device: no sync per chunk
    for lo, hi in chunk_ranges(ids.shape[0], model.config.vocab_size, chunk_elements):
        loss = torch.nn.functional.cross_entropy(head(leaf[lo:hi]).float(), ids[lo:hi], reduction="sum") / n_tokens
        loss.backward()
        total += loss.detach()
    if leaf.grad is not None and hidden.requires_grad:  # a frozen model: the loss only
        hidden.backward(leaf.grad)
    return total.item()


@dataclass
class SftResult:
    steps: int
    final_loss: float
    losses: list[float]
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy) when eval_fn is given


def run_sft(model, tokenizer, examples, schema, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
            warmup_steps: int = 100, weight_decay: float = 0.0, grad_clip: float = 1.0, seed: int = 0,
            progress: bool = True, desc: str = "sft", eval_fn=None, eval_every: int = 0,
            stop_at: float | None = None, logits_chunk: int | None = None) -> SftResult:
    """Train `model` in place for up to `steps` steps on random batches of `examples`.

    With `eval_fn(model) -> accuracy` and `eval_every`, evaluates on that schedule and stops early
    once accuracy reaches `stop_at` (how the comparison's deliberately imperfect teacher is made).
    `logits_chunk`: logits per loss chunk, as train.logits_chunk (None or 0 = the default).
    """
    from tqdm.auto import tqdm

    prompts = encode_prompts(examples, schema, tokenizer)
    answers = encode_answers(examples, tokenizer)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    model.requires_grad_(True)
    optimizer, scheduler = make_optimizer(model, lr, weight_decay, warmup_steps)
    device, chunk_elements = next(model.parameters()).device, logits_chunk or DEFAULT_CHUNK_ELEMENTS
    losses, evals = [], []
    # counted after each finished step, so the bar ends at N/N (or at the step --stop-at stopped at)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for step in range(1, steps + 1):
        idx = [rng.randrange(len(examples)) for _ in range(batch_size)]
        batch = make_sft_batch([prompts[i] for i in idx], [answers[i] for i in idx], tokenizer.pad_token_id)
        losses.append(sft_backward(model, batch.to(device), chunk_elements))  # built on the CPU
        optimizer_step(model, optimizer, scheduler, grad_clip)
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
