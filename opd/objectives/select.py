"""Pick the training objective from the config and apply it to one chunk of completion tokens.

`auto` resolves by what the teacher returns:
- its logits (a local teacher): the exact full-vocabulary reverse KL;
- its top-k log-probs (opd's server, vLLM with --max-logprobs): the top-k reverse KL with a tail
  bucket (exact over the K + 1 buckets);
- only the sampled tokens' log-probs: the clipped sampled-token reverse KL (docs/objectives.md: the
  unclipped form closed far less of the gap than the exact KL on small, peaked teachers).

Both models' log-probs are taken at `objective.temperature` in every objective. A served teacher's
log-probs are at temperature 1, so a served teacher with another temperature is refused (config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.errors import OpdError
from opd.objectives import divergences as D
from opd.objectives.divergences import DIVERGENCES, masked_mean
from opd.objectives.sampled import sampled_token_loss

LOGIT_OBJECTIVES = tuple(DIVERGENCES)
IS_CLIP = 2.0  # truncation of the importance weights of off-policy rows (opd/objectives/offpolicy.py)
TOPK_OBJECTIVES = ("topk_reverse_kl", "topk_forward_kl")
SAMPLED = "sampled_reverse_kl"
NAMES = ("auto", SAMPLED) + LOGIT_OBJECTIVES + TOPK_OBJECTIVES


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): [B,T,V] x [B,T] -> [B,T] (float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


@dataclass
class Objective:
    name: str  # the resolved name (never "auto")
    params: dict  # the parameters that apply to this objective (for the manifest)

    @property
    def temperature(self) -> float:
        return self.params.get("temperature", 1.0)

    @property
    def is_sampled(self) -> bool:
        """The sampled-token estimator: valid only on tokens drawn from p_S at the loss temperature."""
        return self.name == SAMPLED

    def loss(self, chunk) -> torch.Tensor:
        """This chunk's share of the divergence (sum over its tokens / chunk.normalizer).

        `chunk.weights` (None = on-policy) are per-token importance weights for off-policy rows: the
        prefix ratio for exact divergences, prefix and token ratio for the sampled estimator.
        """
        T, weights = self.temperature, chunk.weights
        s_logits = chunk.student_logits
        if self.is_sampled:
            student_lp = token_logprobs(s_logits, chunk.ids, T)
            teacher_lp = chunk.teacher_logprobs if chunk.teacher_logits is None \
                else token_logprobs(chunk.teacher_logits, chunk.ids, T)  # the teacher at the same temperature
            return sampled_token_loss(student_lp, teacher_lp, chunk.mask, clip=self.params["clip"],
                                      weights=weights, normalizer=chunk.normalizer)
        if self.name in TOPK_OBJECTIVES:  # served top-k: at temperature 1, and T = 1 is enforced for it
            k = min(self.params["top_k"], s_logits.shape[-1])  # a vocabulary smaller than k: all of it
            topk = chunk.teacher_topk or D.teacher_topk(chunk.teacher_logits, k, temperature=T)
            per_token = getattr(D, f"per_token_{self.name}")(s_logits, *topk, temperature=T)
        else:
            extra = {k: v for k, v in self.params.items() if k in ("beta", "alpha")}
            per_token = getattr(D, f"per_token_{self.name}")(s_logits, chunk.teacher_logits, temperature=T, **extra)
        if weights is not None:
            per_token = per_token * weights
        return masked_mean(per_token, chunk.mask, chunk.normalizer)


AUTO_SAMPLED_CLIP = 1.0  # docs/objectives.md: clip 1 measured at least as good as 5


def sampled_clip(cfg) -> float | None:
    """The advantage clip of the sampled estimator under an `objective` config: `auto` with the default clip
    uses AUTO_SAMPLED_CLIP; otherwise the configured one (None = off)."""
    default = type(cfg).clip  # the dataclass field's default (opd/config.py)
    return AUTO_SAMPLED_CLIP if cfg.name == "auto" and cfg.clip == default else cfg.clip


def make_objective(cfg, teacher_has_logits: bool = True, teacher_top_k: int = 0) -> Objective:
    """Resolve `objective.name` (auto included) into an Objective with only its relevant params.

    teacher_has_logits: every teacher is local; teacher_top_k: the served teachers' top-k (0 = none)."""
    name = cfg.name
    if name not in NAMES:
        raise OpdError(f"unknown objective {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        name = "reverse_kl" if teacher_has_logits else "topk_reverse_kl" if teacher_top_k else SAMPLED
    if name in TOPK_OBJECTIVES and not teacher_has_logits and not teacher_top_k:
        raise OpdError(f"objective {name} needs the teacher's top-k: set teacher.top_k for a served teacher")
    if name in LOGIT_OBJECTIVES and not teacher_has_logits:
        raise OpdError(f"objective {name} needs the teacher's logits, but the teacher returns only log-probs")
    params = {"temperature": cfg.temperature}
    if name == "jsd":
        params["beta"] = cfg.beta
    elif name.startswith("skew"):
        params["alpha"] = cfg.alpha
    elif name == SAMPLED:
        params["clip"] = sampled_clip(cfg)
    elif name in TOPK_OBJECTIVES:
        params["top_k"] = cfg.top_k if teacher_has_logits else teacher_top_k
    return Objective(name=name, params=params)
