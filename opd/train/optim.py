"""AdamW with linear warm-up, and one optimizer step with clipping and a finite-gradient guard.

With `train.precision: bfloat16_weights` the model holds bfloat16 weights (half the memory of its
weights, gradients and activations) while the optimizer updates float32 master copies: an update
of lr x 1e-3 relative size would mostly round away in bfloat16's 8-bit mantissa. The masters are
part of the optimizer's state_dict, so a checkpoint resumes exactly.
"""

from __future__ import annotations

import math

import torch


class MasterWeights:
    """An AdamW over float32 copies of a low-precision model's trainable parameters.

    step(): gradients are copied up to the masters, the inner optimizer steps them, and the result is
    copied back down into the model. state_dict() holds the inner optimizer's state and the masters.
    """

    def __init__(self, params, **adamw):
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, **adamw)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def step(self):
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach().cpu() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                m.copy_(saved)
                p.copy_(saved)


def make_optimizer(model, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0, master_weights: bool = False):
    """AdamW over the trainable parameters (float32 masters when `master_weights`), and its warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    if master_weights:
        optimizer = MasterWeights(params, lr=lr, weight_decay=weight_decay)
        inner = optimizer.inner
    else:
        optimizer = inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        inner, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def optimizer_step(model, optimizer, scheduler, grad_clip: float) -> tuple[float, bool]:
    """Clip, step, zero. Returns (gradient norm, whether the step was applied).

    A non-finite gradient norm skips the update (and is reported) instead of poisoning the weights.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    applied = math.isfinite(norm)
    if applied:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied
