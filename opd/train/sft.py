"""Supervised fine-tuning on prompt -> answer: loss on answer tokens and EOS only.

Used to make teachers from scratch, to warm up an ignorant student, and (with teacher traces as
answers) as the off-policy baseline. A row may also be a whole chat episode (a Transcript, e.g. tool
calls and their results): rendered by the tokenizer's chat template exactly as opd's episodes are
(opd/rollout/episodes.py), trained on the assistant turns (content + EOS) only, every other token
context (attended, loss mask 0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from opd.rollout.prompts import encode_answers, encode_prompts
from opd.batch import Batch, make_sft_batch
from opd.errors import OpdError
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


def encode_transcript(messages: list[dict], tokenizer, chat_kwargs: dict | None = None) -> tuple[list, list, list]:
    """(prompt ids, completion ids, trained 0/1 per completion id) of one episode, segmented as
    run_episodes segments the model's own: the opening messages with the generation prompt, then per
    assistant turn its content + EOS (trained), then the template's text up to the next assistant
    turn (context). Messages after the last assistant turn are dropped (nothing to predict)."""
    from opd.rollout.episodes import render, template_delta

    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise OpdError("a transcript without an assistant message has nothing to train on")
    eos = tokenizer.eos_token_id
    eos_text = tokenizer.decode([eos], skip_special_tokens=False)
    text = render(tokenizer, messages[:turns[0]], True, chat_kwargs)
    prompt, ids, trained = _encode(tokenizer, text), [], []
    for k, nxt in zip(turns, turns[1:] + [None]):
        reply = messages[k]["content"]
        ids += _encode(tokenizer, reply) + [eos]
        trained += [1] * (len(ids) - len(trained))
        text += reply + eos_text
        if nxt is None:
            break
        before = render(tokenizer, messages[:k + 1], False, chat_kwargs)
        delta = template_delta(before, render(tokenizer, messages[:nxt], True, chat_kwargs), eos_text)
        ids += _encode(tokenizer, delta)
        trained += [0] * (len(ids) - len(trained))
        text += delta
    if text != render(tokenizer, messages[:turns[-1] + 1], False, chat_kwargs):
        raise OpdError("the chat template does not end an assistant turn with the reply and EOS (or its rendering "
                       "changes as messages are added): opd cannot train on transcripts with it")
    return prompt, ids, trained


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_sft_rows(examples, schema, tokenizer) -> list[tuple[list, list, list]]:
    """(prompt ids, target ids, trained mask) of each row: an Example's answer + EOS is all trained; a
    Transcript (opd/tasks/data.py) is encoded by encode_transcript with the schema's chat kwargs."""
    from opd.tasks.data import Transcript

    plain = [ex for ex in examples if not isinstance(ex, Transcript)]
    encoded = iter(zip(encode_prompts(plain, schema, tokenizer), encode_answers(plain, tokenizer))) if plain else None
    out = []
    for ex in examples:
        if isinstance(ex, Transcript):
            out.append(encode_transcript(ex.messages, tokenizer, getattr(schema, "chat_template_kwargs", None)))
        else:
            prompt, answer = next(encoded)
            out.append((prompt, answer, [1] * len(answer)))
    return out


def make_masked_sft_batch(rows: list[tuple[list, list, list]], pad_id: int) -> Batch:
    """make_sft_batch with a trained mask per target: 1 → completion_mask (loss), 0 → context_mask."""
    batch = make_sft_batch([r[0] for r in rows], [r[1] for r in rows], pad_id)
    if all(all(r[2]) for r in rows):
        return batch
    trained = torch.zeros_like(batch.completion_mask)
    for i, (_, _, mask) in enumerate(rows):
        trained[i, :len(mask)] = torch.tensor(mask, dtype=torch.long)
    batch.context_mask = batch.completion_mask * (1 - trained)
    batch.completion_mask = trained
    return batch


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
    """Train `model` in place for up to `steps` steps on random batches of `examples` (Examples and
    Transcripts, opd/tasks/data.py).

    With `eval_fn(model) -> accuracy` and `eval_every`, evaluates on that schedule and stops early
    once accuracy reaches `stop_at` (how the comparison's deliberately imperfect teacher is made).
    `logits_chunk`: logits per loss chunk, as train.logits_chunk (None or 0 = the default).
    """
    from tqdm.auto import tqdm

    rows = encode_sft_rows(examples, schema, tokenizer)
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
        batch = make_masked_sft_batch([rows[i] for i in idx], tokenizer.pad_token_id)
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
