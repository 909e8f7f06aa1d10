"""A lean one-token decode step for Llama-family models (Llama, Mistral, Qwen2, Qwen3).

Why: a batched decode of a small model is bound by per-token overhead, not arithmetic
(bench/NOTES.md: sampling was the largest phase of a step, far above its FLOP floor). The Hugging Face forward
spends most of a decode step on bookkeeping (mask building, DynamicCache growth by `cat`,
module dispatch). This step runs the same mathematics in ~20 tensor ops per layer:

- the KV cache is allocated once per generate call, at its final length (a static cache);
- q/k/v and gate/up projections are fused into one matmul each (weights concatenated once per
  call, since training changes them every step);
- RoPE for q and k together, as x*cos + (x@R)*sin with R the fixed rotate-half matrix;
- rows that have finished are dropped from the batch once they are half of it.

The prompt (prefill) still goes through the model's own forward, whose KV cache is copied in, so
only the per-token step is re-implemented. `supports(model)` says whether a model qualifies;
anything else takes the plain Hugging Face path. Tests check the logits of both paths agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # rope types whose inv_freq does not depend on length


def supports(model) -> bool:
    """True when `model` is a Llama-family decoder this step reproduces exactly."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _TYPES:
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    core = getattr(model, "model", None)
    return (getattr(cfg, "hidden_act", None) == "silu"
            and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "pretraining_tp", 1) == 1
            and not getattr(cfg, "use_sliding_window", False)
            and (getattr(cfg, "model_type") != "mistral" or getattr(cfg, "sliding_window", None) is None)
            and rope.get("rope_type", "default") in _STATIC_ROPE
            and core is not None and hasattr(core, "rotary_emb") and hasattr(core, "layers")
            and getattr(model, "lm_head", None) is not None)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalise in float32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    y = F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)
    return y if weight is None else weight * y


class LeanDecoder:
    """The decode step of one model, with its weights fused for one generate call."""

    def __init__(self, model):
        cfg, core = model.config, model.model
        self.eps = cfg.rms_norm_eps
        first = core.layers[0].self_attn
        self.head_dim = first.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = first.scaling
        self.embed = core.embed_tokens.weight
        self.norm = core.norm.weight
        self.lm_head = model.lm_head.weight
        self.lm_bias = model.lm_head.bias
        self.layers = []
        for layer in core.layers:
            a, m = layer.self_attn, layer.mlp
            biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            qk_norm = None
            if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm of q and k, one weight row per head
                qk_norm = torch.cat([a.q_norm.weight.expand(self.n_heads, -1), a.k_norm.weight.expand(self.n_kv, -1)])
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                qkv_bias=torch.cat(biases) if biases[0] is not None else None,
                qk_norm=qk_norm, o=a.o_proj.weight, o_bias=a.o_proj.bias,
                gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]), down=m.down_proj.weight,
            ))
        rot = core.rotary_emb
        self.inv_freq, self.rope_scale = rot.inv_freq.float(), float(getattr(rot, "attention_scaling", 1.0))
        half = self.head_dim // 2
        r = torch.zeros(self.head_dim, self.head_dim, dtype=self.embed.dtype)  # x @ r == rotate_half(x)
        r[torch.arange(half) + half, torch.arange(half)] = -1
        r[torch.arange(half), torch.arange(half) + half] = 1
        self.rotate = r

    def rope_tables(self, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        dtype = self.embed.dtype
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def step(self, tok: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list, valid: torch.Tensor,
             t: int) -> torch.Tensor:
        """Logits [b, V] after feeding tokens `tok` [b] written at cache index t.

        cos/sin [b, head_dim] are the rows' RoPE values at their own positions; caches is a list of
        (K, V) [b, n_kv, S, head_dim]; valid [b, S] marks the cache slots a row may attend to.
        """
        b, nh, nkv, hd = tok.shape[0], self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(tok, self.embed)
        cos, sin = cos[:, None, :], sin[:, None, :]
        mask = valid[:, None, None, :t + 1]
        for w, (k_cache, v_cache) in zip(self.layers, caches):
            h = _rms(x, w["ln1"], self.eps)
            qkv = F.linear(h, w["qkv"], w["qkv_bias"]).view(b, nh + 2 * nkv, hd)
            qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]
            if w["qk_norm"] is not None:
                qk = _rms(qk, None, self.eps) * w["qk_norm"]
            qk = qk * cos + (qk @ self.rotate) * sin
            k_cache[:, :, t] = qk[:, nh:]
            v_cache[:, :, t] = v
            attn = F.scaled_dot_product_attention(qk[:, :nh, None], k_cache[:, :, :t + 1], v_cache[:, :, :t + 1],
                                                  attn_mask=mask, scale=self.scaling, enable_gqa=nkv != nh)
            x = x + F.linear(attn.reshape(b, nh * hd), w["o"], w["o_bias"])
            h = _rms(x, w["ln2"], self.eps)
            gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return F.linear(_rms(x, self.norm, self.eps), self.lm_head, self.lm_bias)
