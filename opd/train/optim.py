"""AdamW with linear warm-up, and one optimizer step with clipping and a finite-gradient guard."""

from __future__ import annotations

import math

import torch


def make_optimizer(model, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def optimizer_step(model, optimizer, scheduler, grad_clip: float) -> tuple[float, bool]:
    """Clip, step, zero. Returns (gradient norm, whether the step was applied).

    A non-finite gradient norm skips the update (and is reported) instead of poisoning the weights.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    applied = math.isfinite(norm)
    if applied:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied
