"""LoRA students with peft: wrap, resume, look through the wrapper, and write the final student.

Only the adapters train; a checkpoint (`PeftModel.save_pretrained`) holds only them, and a resume
rebuilds the student as the base model plus the checkpoint's adapter. The final student is written
twice: the adapter, and a merged plain model that `AutoModelForCausalLM.from_pretrained` loads
like any other. peft is imported only when a LoRA student is built (opd imports without it).
`is_peft`, `unwrap` and `effective_weight` are defined in opd/rollout/fast_decode.py and re-exported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd.errors import OpdError
# the peft-aware model view lives with the lean decode, its main user (rollout cannot import backends)
from opd.rollout.fast_decode import effective_weight, is_lora_layer, is_peft, unwrap  # noqa: F401


def _import_peft():
    try:
        import peft
    except ImportError:
        raise OpdError("student.lora needs peft: pip install 'opd[lora]'") from None
    return peft


def apply_lora(model, lora_cfg, seed: int = 0):
    """`model` (a Hugging Face causal LM) wrapped in a peft LoRA PeftModel; only the adapters train.

    lora_cfg is opd.config.LoraConfig with r > 0. peft wraps the model's own modules in place: keep
    using the returned PeftModel, not `model`. The adapters' random initialisation is drawn from
    `seed` (the run's train.seed), so a run is reproducible and a resume continues the same run."""
    import torch

    peft = _import_peft()
    targets = lora_cfg.target_modules
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                             lora_dropout=lora_cfg.dropout,
                             target_modules=targets if isinstance(targets, str) else list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, config)
    _check_mergeable(wrapped)
    return wrapped


def _check_mergeable(model) -> None:
    """A LoRA on a tied embedding (or head) would change both ends in a merged model but only one in the
    adapted one, so the merged student would not be the trained student."""
    lm = unwrap(model)
    ends = (lm.get_input_embeddings(), lm.get_output_embeddings())
    if getattr(lm.config, "tie_word_embeddings", False) and any(is_lora_layer(m) for m in ends):
        raise OpdError("student.lora.target_modules adapts a tied embedding/lm_head; the merged model would "
                       "differ from the trained one: leave embed_tokens and lm_head out")


def load_adapter(base_model, adapter_dir, trainable: bool = True):
    """`base_model` plus the adapter saved in `adapter_dir` (a checkpoint or student-adapter/)."""
    peft = _import_peft()
    return peft.PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The plain causal LM's state dict (CPU tensors) with every LoRA layer folded into its base weight.

    Built layer by layer, so the device holds one extra weight at a time and the live model is untouched
    (merging in place and unmerging would not restore the base weights bit for bit)."""
    lm = unwrap(model)
    layers = {f"{name}.": m for name, m in lm.named_modules() if is_lora_layer(m)}
    out = {}
    for key, tensor in lm.state_dict().items():
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is None:
            out[key] = tensor.cpu()
        elif key == f"{prefix}base_layer.weight":
            out[f"{prefix}weight"] = effective_weight(layers[prefix]).cpu()
        elif key == f"{prefix}base_layer.bias":
            out[f"{prefix}bias"] = tensor.cpu()
        # other keys of a LoRA layer are the adapters themselves (lora_A, lora_B, ...): folded in above
    return out


def save_merged(model, out: Path) -> None:
    """Write the merged plain model to `out` (safetensors): a skeleton on the meta device takes the merged
    weights, so no second copy of the student is ever initialised."""
    from transformers import AutoModelForCausalLM

    lm = unwrap(model)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(lm.config)
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    plain.tie_weights()  # assign=True replaced the tied parameters one by one
    plain.generation_config = lm.generation_config
    plain.save_pretrained(out, safe_serialization=True)


def save_student(model, tokenizer, merged_dir: Path, adapter_dir: Path | None = None, state_dict=None) -> None:
    """The final student: a PeftModel writes its adapter to adapter_dir (when given) and the merged model
    to merged_dir; a plain model writes itself to merged_dir (`state_dict`: its gathered weights, FSDP2).
    The tokenizer goes into each folder."""
    merged_dir = Path(merged_dir)
    merged_dir.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir, safe_serialization=True)
            tokenizer.save_pretrained(adapter_dir)
        save_merged(model, merged_dir)
    else:
        model.save_pretrained(merged_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(merged_dir)
