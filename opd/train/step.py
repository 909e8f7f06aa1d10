"""One optimizer step for any method: micro-batches of rows, chunks of completion tokens.

The method (opd/methods/) says what its loss is on a chunk; this module owns everything shared:
the body/head split, chunking, micro-batching, precision, importance weights for rows the current
student did not sample, and the step's statistics.
"""

from __future__ import annotations

import torch

from opd.batch import Batch
from opd.methods.base import Chunk
from opd.objectives.divergences import per_token_reverse_kl
from opd.objectives.offpolicy import prefix_weights
from opd.objectives.sampled import k3
from opd.objectives.select import IS_CLIP, token_logprobs
from opd.scores import TeacherScores, limit_vocab
from opd.train.chunked import DEFAULT_CHUNK_ELEMENTS, chunk_ranges, completion_hidden, split_lm
from opd.sharded import idle_pass, is_sharded
from opd.train.optim import optimizer_step
from opd.world import World


def student_precision(name: str, device="cpu") -> str:
    """train.precision resolved for the student's device: auto = bfloat16 weights on a GPU with native
    bfloat16, float32 elsewhere (on CPU bf16 was measured no faster and slightly worse, bench/NOTES.md)."""
    from opd.backends.hf import native_bf16

    if name != "auto":
        return name
    device = torch.device(device)
    return "bfloat16_weights" if device.type == "cuda" and native_bf16(device) else "float32"


def weighted_rows(objective, sources: list[str], lag: int, rollout_temperature: float) -> torch.Tensor:
    """[B] bool: rows whose tokens need importance weights (docs/objectives.md).

    Exact divergences sum over each position's next token, so only an off-policy *prefix* needs a
    correction: stale student rows. Teacher-sampled rows (sft/mixed/kd) are the method's own choice of
    distribution and are not reweighted. The sampled-token estimator is valid only on tokens drawn from
    the current student at the loss temperature, so it reweights every other row."""
    student = torch.tensor([s == "student" for s in sources])
    stale = student & (lag > 0)
    if not objective.is_sampled:
        return stale
    other_temperature = rollout_temperature != objective.temperature
    return stale | ~student | (student & other_temperature)


def micro_batches(rows: int, width: int, max_rows: int, max_tokens: int) -> list[slice]:
    """Row slices of at most max_rows rows (0 = all) and max_tokens padded tokens (0 = no budget); a row
    wider than the token budget is a micro-batch of its own."""
    per = min(max_rows or rows, max(1, max_tokens // max(width, 1)) if max_tokens else rows)
    return [slice(lo, lo + per) for lo in range(0, rows, per)]


def update(student, optimizer, scheduler, method, objective, batch: Batch, cfg, *,
           scores: TeacherScores | None = None, advantages: torch.Tensor | None = None,
           weighted: torch.Tensor | None = None, rollout_temperature: float = 1.0,
           vocab_size: int | None = None, world: World | None = None) -> dict:
    """One optimizer step on `batch` (the kept rows); returns its statistics.

    Every loss is a sum over completion tokens divided by the token count of the whole batch, so
    neither micro-batches (gradient accumulation) nor token chunks change the loss or the gradient.
    The student's body runs once per micro-batch; its head, the teacher's head and the loss run per
    chunk of at most `cfg.logits_chunk` logits, with the chunk's gradient handed back to the body.
    `weighted` [B] marks rows that get importance weights (see `weighted_rows`). Micro-batches hold at
    most `cfg.micro_batch_size` rows and `cfg.micro_batch_tokens` tokens. `vocab_size`: the
    tokenizer's real ids; both models' distributions are compared over those (padded embeddings).
    The batch and the scores may live on the CPU: each tensor moves to the student's device here.
    `world`: in a distributed job this rank's rows; the token count is the global one and the
    gradients are summed over ranks once, before the optimizer step, so the update does not depend
    on the number of ranks (a rank with no kept rows still takes part, with zero gradients).
    """
    world = world or World()
    assert batch.completion_mask.shape == batch.completion_ids.shape
    device = next(student.parameters()).device
    batch = batch.to(device)
    n_tokens = max(int(world.sum(batch.completion_mask.sum())[0]), 1)  # every rank's tokens
    rows = batch.prompt_ids.shape[0]
    width = batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    chunk_elements = cfg.logits_chunk or DEFAULT_CHUNK_ELEMENTS
    # bf16 autocast for the student's matmuls (weights, gradients, optimizer and the loss stay float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=student_precision(cfg.precision, device) == "bfloat16")
    _, head = split_lm(student)
    head = limit_vocab(head, vocab_size)
    vocab = vocab_size or student.config.vocab_size
    # the exact reverse KL at temperature 1, unweighted, is its own per-token KL metric: no second pass
    loss_is_kl = (method.uses_teacher and objective.name == "reverse_kl" and objective.temperature == 1.0
                  and (weighted is None or not weighted.any()))
    total_loss, kl_sum, teacher_lp_sum = 0.0, 0.0, 0.0
    parts = micro_batches(rows, width, cfg.micro_batch_size, cfg.micro_batch_tokens) if rows else []
    sharded = is_sharded(student)  # FSDP2: every rank runs as many forwards, the last one reduces gradients
    passes = int(world.max(len(parts))) if sharded else len(parts)
    for i in range(passes):
        part = parts[i] if i < len(parts) else slice(0, 0)
        if sharded:
            student.set_requires_gradient_sync(i == passes - 1)
        sub = batch.rows(part)
        sel = sub.completion_mask.bool()
        n = int(sel.sum())
        if n == 0:
            if sharded:
                idle_pass(student)
            continue
        with autocast:
            hidden = completion_hidden(student, sub)[sel]  # [n, H] (or [n, V] logits without a head split)
        leaf = hidden.detach().requires_grad_()
        ids = sub.completion_ids[sel][:, None]  # each token is a row of length 1: [n, 1]
        chunks = chunk_ranges(n, vocab, chunk_elements)
        flat = scores.rows(part).flat(sel) if scores is not None else None
        adv = advantages[part].to(device)[:, None].expand(sel.shape)[sel] if advantages is not None else None
        weights = None
        if weighted is not None and weighted[part].any():
            weights = _importance_weights(head, leaf, ids, sub, sel, weighted[part].to(device), chunks, autocast,
                                          objective, rollout_temperature)
        for a, b in chunks:
            with autocast:
                s_logits = head(leaf[a:b])
            topk = flat.topk(a, b) if flat is not None else None
            chunk = Chunk(student_logits=s_logits.float()[:, None], ids=ids[a:b], normalizer=n_tokens,
                          teacher_logits=flat.logits(a, b, device)[:, None] if flat is not None and flat.heads else None,
                          teacher_topk=tuple(t.to(device) for t in topk) if topk is not None else None,
                          teacher_logprobs=flat.logprobs[a:b, None].to(device) if flat is not None else None,
                          advantages=adv[a:b] if adv is not None else None,
                          weights=weights[a:b, None] if weights is not None else None)
            loss = method.loss(chunk, objective)
            if flat is not None:
                t_lp = chunk.teacher_logprobs
                if loss_is_kl:
                    kl_sum += loss.item() * n_tokens
                elif chunk.teacher_logits is not None:  # exact per-token KL; with log-probs only, the k3 estimate
                    kl_sum += float(per_token_reverse_kl(chunk.student_logits.detach(), chunk.teacher_logits).sum())
                else:
                    kl_sum += float(k3(chunk.student_logprobs.detach(), t_lp).sum())
                teacher_lp_sum += float(t_lp.sum())
            loss.backward()
            total_loss += loss.item()
        if hidden.requires_grad and (leaf.grad is not None or sharded):
            hidden.backward(leaf.grad if leaf.grad is not None else torch.zeros_like(hidden))
    if not sharded:  # FSDP2 reduce-scattered the gradients in the last backward
        world.sync_grads(student.parameters())
    grad_norm, applied = optimizer_step(student, optimizer, scheduler, cfg.grad_clip)
    total_loss, kl_sum, teacher_lp_sum = world.sum(total_loss, kl_sum, teacher_lp_sum)
    stats = {"loss": total_loss, "grad_norm": grad_norm, "update_applied": applied}
    if scores is not None and method.uses_teacher:
        stats.update(reverse_kl=kl_sum / n_tokens, teacher_logprob=teacher_lp_sum / n_tokens)
    return stats


@torch.no_grad()
def _importance_weights(head, leaf, ids, sub: Batch, sel, weighted, chunks, autocast, objective,
                        rollout_temperature) -> torch.Tensor:
    """Flat [n] weights of one micro-batch's tokens (1 on rows not in `weighted`): the current student's
    log-probs of every sampled token (a head pass without gradient), then opd/objectives/offpolicy.py."""
    prefix, token = torch.zeros(sel.shape, device=sel.device), torch.zeros(sel.shape, device=sel.device)
    flat_prefix, flat_token = torch.empty(ids.shape[0], device=sel.device), torch.empty(ids.shape[0], device=sel.device)
    for a, b in chunks:
        with autocast:
            logits = head(leaf[a:b]).float()[:, None]
        flat_prefix[a:b] = token_logprobs(logits, ids[a:b], rollout_temperature)[:, 0]
        flat_token[a:b] = token_logprobs(logits, ids[a:b], objective.temperature)[:, 0]
    prefix[sel], token[sel] = flat_prefix, flat_token
    weights = prefix_weights(prefix, sub.sample_logprobs, sub.completion_mask,
                             token_logprobs=token if objective.is_sampled else None, clip=IS_CLIP)
    weights = torch.where(weighted[:, None], weights, torch.ones_like(weights))
    return weights[sel]
