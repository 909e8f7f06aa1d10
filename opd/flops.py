"""FLOP accounting from model shapes and token counts (the usual 2·N per token rule).

Forward cost of one token at context length c: 2·N (every parameter multiplies once; N counts
the tied LM head once, which is the matmul that matters; embedding lookups are free) plus
attention 2·2·L·c·d (scores and weighted sum over c keys, L layers, width d). Training is ≈3× a
forward (backward ≈ 2× forward). Used to compare methods at equal compute.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    width: int  # attention width: heads × head_dim

    @classmethod
    def of(cls, model) -> "ModelShape":
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        params = sum(p.numel() for p in model.parameters())
        if not getattr(cfg, "tie_word_embeddings", False):  # an untied input embedding is a lookup, not a matmul
            params -= model.get_input_embeddings().weight.numel()
        return cls(params=params, layers=cfg.num_hidden_layers, width=heads * head_dim)

    def forward_flops(self, new_tokens: int, context: int) -> float:
        """Forward FLOPs for `new_tokens` tokens that each attend to about `context` positions."""
        return new_tokens * (2.0 * self.params + 4.0 * self.layers * context * self.width)


def sequence_flops(shape: ModelShape, prompt_lens, completion_lens, *, train: bool = False) -> float:
    """One full pass over prompt+completion per row (teacher scoring, or ×3 for a training step)."""
    total = 0.0
    for p, c in zip(prompt_lens, completion_lens):
        n = p + c
        total += shape.forward_flops(n, n / 2)  # causal: on average half the sequence is attended
    return 3.0 * total if train else total


def generation_flops(shape: ModelShape, prompt_lens, completion_lens) -> float:
    """Prefill of the prompt, then one cached forward per sampled token."""
    total = 0.0
    for p, c in zip(prompt_lens, completion_lens):
        total += shape.forward_flops(p, p / 2) + shape.forward_flops(c, p + c / 2)
    return total


def step_flops(shapes: dict, batch, sources: list[str], teacher_names: list[str], *, generated: bool,
               scored: bool, trained=None) -> float:
    """One step: generation of the sampled rows (by whoever wrote them), teacher scoring, and training
    of the rows selected by `trained` (a bool mask; None = no update ran)."""
    p_lens = batch.prompt_mask.sum(1).tolist()
    c_lens = batch.completion_lengths().tolist()
    total = 0.0
    if trained is not None:
        rows = trained.tolist()
        total += sequence_flops(shapes["student"], [p for p, k in zip(p_lens, rows) if k],
                                [c for c, k in zip(c_lens, rows) if k], train=True)
    for src, name, p, c in zip(sources, teacher_names, p_lens, c_lens):
        if generated and src != "anchor":
            total += generation_flops(shapes[name if src == "teacher" else "student"], [p], [c])
        if scored and name in shapes:  # a remote teacher's size is unknown: its FLOPs are not counted
            total += sequence_flops(shapes[name], [p], [c])
    return total
