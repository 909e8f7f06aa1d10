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

A peft LoRA student (a PeftModel, or a causal LM with LoRA layers injected) decodes with each layer's
effective weight W + scaling * B @ A, computed once per call like the fusion. That peft-aware view of
a model (`unwrap`, `effective_weight`) is defined here and re-exported by opd/backends/lora.py. It finds
peft in `sys.modules` instead of importing it: a model can hold peft layers only once peft is imported,
and opd imports without peft.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # rope types whose inv_freq does not depend on length


def is_peft(model) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model):
    """The Hugging Face causal LM inside a PeftModel (its LoRA layers in place); any other model itself.

    Needed because a PeftModel forwards unknown attributes to the causal LM, so `peft_model.model` is
    the whole causal LM, not its body."""
    return model.get_base_model() if is_peft(model) else model


def is_lora_layer(module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.tuners.lora.LoraLayer)


def lean_compatible(model) -> bool:
    """True when every peft layer in `model` is plain LoRA (no DoRA or other variant, no adapter bias, no
    other tuner), so `effective_weight` reproduces each layer's forward in eval."""
    peft = sys.modules.get("peft")
    if peft is None:
        return True
    tuner = peft.tuners.tuners_utils.BaseTunerLayer
    for module in model.modules():
        if not isinstance(module, tuner):
            continue
        if not is_lora_layer(module):
            return False
        active = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        if any(a in module.lora_variant or module.lora_bias.get(a, False) for a in active):
            return False
    return True


def effective_weight(module) -> torch.Tensor:
    """The weight `module`'s forward applies in eval (dropout off): a peft LoRA layer's base weight plus
    scaling * B @ A of each active adapter, following the layer's merged/disabled state; any other
    module's own weight."""
    if not is_lora_layer(module):
        return module.weight
    base = module.get_base_layer().weight
    if module.disable_adapters:  # the forward unmerges first, then runs the base layer alone
        return base - _delta(module, module.merged_adapters, base.dtype) if module.merged else base
    if module.merged:  # the forward then runs the base layer alone: merged adapters are in its weight
        return base
    return base + _delta(module, module.active_adapters, base.dtype)


def _delta(module, adapters, dtype) -> torch.Tensor | float:
    names = [a for a in adapters if a in module.lora_A or a in module.lora_embedding_A]
    return sum((module.get_delta_weight(a).to(dtype) for a in names), 0.0)


def supports(model) -> bool:
    """True when `model` is a Llama-family decoder this step reproduces exactly."""
    model = unwrap(model)
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
            and getattr(model, "lm_head", None) is not None
            and lean_compatible(model))


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalise in float32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    y = F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)
    return y if weight is None else weight * y


class LeanDecoder:
    """The decode step of one model, with its weights fused for one generate call."""

    def __init__(self, model):
        model, w = unwrap(model), effective_weight  # w: a layer's weight with its LoRA adapters
        cfg, core = model.config, model.model
        self.eps = cfg.rms_norm_eps
        first = core.layers[0].self_attn
        self.head_dim = first.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = first.scaling
        self.embed = w(core.embed_tokens)
        self.norm = core.norm.weight
        self.lm_head = w(model.lm_head)
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
                qkv=torch.cat([w(a.q_proj), w(a.k_proj), w(a.v_proj)]),
                qkv_bias=torch.cat(biases) if biases[0] is not None else None,
                qk_norm=qk_norm, o=w(a.o_proj), o_bias=a.o_proj.bias,
                gate_up=torch.cat([w(m.gate_proj), w(m.up_proj)]),
                down=w(m.down_proj),
            ))
        rot = core.rotary_emb
        self.inv_freq = rot.inv_freq.float().to(self.embed.device)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        half, device = self.head_dim // 2, self.embed.device
        # x @ r == rotate_half(x)
        r = torch.zeros(self.head_dim, self.head_dim, dtype=self.embed.dtype, device=device)
        idx = torch.arange(half, device=device)
        r[idx + half, idx] = -1
        r[idx, idx + half] = 1
        self.rotate = r

    def rope_tables(self, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(max_position, dtype=torch.float32, device=self.inv_freq.device)
        freqs = positions[:, None] * self.inv_freq[None, :]
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
