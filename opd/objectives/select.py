"""Pick the training objective from the config and apply it to one micro-batch.

`auto` resolves to the exact full-vocabulary reverse KL when the teacher's logits are local, and
to the clipped sampled-token reverse KL when the teacher returns only per-token log-probs
(MEASURED.md: the unclipped sampled form closed 6% of the gap on small peaked teachers, the
exact KL 88-98%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.errors import OpdError
from opd.objectives import divergences as D
from opd.objectives.divergences import DIVERGENCES, masked_mean
from opd.objectives.sampled import sampled_token_loss

LOGIT_OBJECTIVES = tuple(DIVERGENCES)
IS_CLIP = 2.0  # truncation of the per-token importance weight for stale rollouts
TOPK_OBJECTIVES = ("topk_reverse_kl", "topk_forward_kl")
NAMES = ("auto", "sampled_reverse_kl") + LOGIT_OBJECTIVES + TOPK_OBJECTIVES


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): [B,T,V] x [B,T] -> [B,T] (float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


@dataclass
class Objective:
    name: str  # the resolved name (never "auto")
    params: dict  # the parameters that apply to this objective (for the manifest)

    def loss(self, student_logits, teacher_logits, teacher_logprobs, completion_ids, mask, *,
             sampling_logprobs=None, normalizer=None, teacher_topk=None) -> torch.Tensor:
        """Scalar loss over one micro-batch; `normalizer` = completion tokens in the whole batch.

        `sampling_logprobs` (given only for stale rollouts) adds a truncated importance weight
        min(p_S(x)/p_sample(x), 2) per token: inside the sampled estimator, and as a detached
        per-token weight on the exact divergences.
        """
        temperature = self.params.get("temperature", 1.0)
        if self.name == "sampled_reverse_kl":
            student_lp = token_logprobs(student_logits, completion_ids, temperature)
            if sampling_logprobs is not None:  # rows with no sampler (anchors) get weight 1
                sampling_logprobs = torch.where(sampling_logprobs.isnan(), student_lp.detach(), sampling_logprobs)
            return sampled_token_loss(student_lp, teacher_logprobs, mask, sampling_logprobs=sampling_logprobs,
                                      clip=self.params["clip"], is_clip=IS_CLIP, normalizer=normalizer)
        if self.name in TOPK_OBJECTIVES:  # teacher_topk = (log-probs [B,T,K], ids [B,T,K]), already at temperature 1
            if teacher_topk is None:
                teacher_topk = D.teacher_topk(teacher_logits, self.params["top_k"], temperature=temperature)
            per_token = getattr(D, f"per_token_{self.name}")(student_logits, *teacher_topk, temperature=temperature)
            return masked_mean(per_token * self._is_weight(student_logits, completion_ids, sampling_logprobs),
                               mask, normalizer)
        extra = {k: v for k, v in self.params.items() if k in ("beta", "alpha")}
        if sampling_logprobs is None:
            return DIVERGENCES[self.name](student_logits, teacher_logits, mask, temperature=temperature,
                                          normalizer=normalizer, **extra)
        per_token = getattr(D, f"per_token_{self.name}")(student_logits, teacher_logits, temperature=temperature, **extra)
        return masked_mean(per_token * self._is_weight(student_logits, completion_ids, sampling_logprobs),
                           mask, normalizer)

    @staticmethod
    @torch.no_grad()
    def _is_weight(student_logits, completion_ids, sampling_logprobs):
        """min(p_S(x)/p_sample(x), 2) per token for stale rollouts; 1 when fresh or without a sampler."""
        if sampling_logprobs is None:
            return 1.0
        ratio = (token_logprobs(student_logits, completion_ids) - sampling_logprobs).exp().clamp(max=IS_CLIP)
        return torch.where(sampling_logprobs.isnan(), torch.ones_like(ratio), ratio)  # anchors: no sampler


def make_objective(cfg, teacher_has_logits: bool = True, teacher_top_k: int = 0) -> Objective:
    """Resolve `objective.name` (auto included) into an Objective with only its relevant params."""
    name = cfg.name
    if name not in NAMES:
        raise OpdError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        name = "reverse_kl" if teacher_has_logits else "sampled_reverse_kl"
    if name in TOPK_OBJECTIVES and not teacher_has_logits and not teacher_top_k:
        raise OpdError(f"objective {name} needs the teacher's top-k: set teacher.top_k for a served teacher")
    if name in LOGIT_OBJECTIVES and not teacher_has_logits:
        raise OpdError(f"objective {name} needs the teacher's logits, but the teacher returns only log-probs")
    params = {"temperature": cfg.temperature}
    if name == "jsd":
        params["beta"] = cfg.beta
    elif name.startswith("skew"):
        params["alpha"] = cfg.alpha
    elif name == "sampled_reverse_kl":
        params["clip"] = cfg.clip
    elif name in TOPK_OBJECTIVES:
        params["top_k"] = cfg.top_k if teacher_has_logits else teacher_top_k
    return Objective(name=name, params=params)
