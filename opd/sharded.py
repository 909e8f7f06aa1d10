"""FSDP2 (`train.fsdp: true`): the student's parameters, gradients and optimizer state sharded over the
ranks with torch's `fully_shard`, one unit per decoder layer plus the root (embeddings, norm, head).

opd's update runs the body once per micro-batch and the head per chunk of tokens (opd/train/chunked.py).
Under FSDP2 the body runs as the root module's own forward with the head bypassed, so every unit's
all-gather and reduce-scatter hooks fire as FSDP2 expects; the root's parameters (the tied head among
them) stay gathered from that forward until its backward, which is when the head chunks use them.
Decoding (rollouts, evaluation, the preflight) runs inside `gathered`: every unit is all-gathered once,
then the sampler reads whole weights, with no collective per token.

Checkpoints are gathered (full, unsharded) model and optimizer state written by rank 0, the same files
as without FSDP2: a run resumes with or without it and on any number of ranks. This is the ground
floor: torch only.
"""

from __future__ import annotations

from contextlib import contextmanager


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model, param_dtype=None):
    """fully_shard every decoder layer, then the whole causal LM (the root). `param_dtype`: compute
    dtype of the gathered weights (bfloat16 on GPUs) over float32 shards, gradients reduced in float32.
    Gradients are summed over ranks, not averaged: opd divides every loss by the global token count."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for unit in units(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum
    return model


def decoder_layers(model) -> list:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        from opd.errors import OpdError

        raise OpdError(f"train.fsdp: {type(model).__name__} has no model.layers to shard (a Hugging Face decoder "
                       "such as Llama or Qwen is expected)")
    return list(layers)


def units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model):
    """Every unit's full weights for a stretch of local forwards (decoding); all ranks enter together
    (one all-gather per unit), none leaves a collective behind, so ranks may decode different rows.
    Re-entrant: only the outermost level gathers and frees."""
    depth = getattr(model, "_opd_gathered", 0)
    if not is_sharded(model) or depth:
        model._opd_gathered = depth + 1 if is_sharded(model) else 0
        try:
            yield model
        finally:
            model._opd_gathered = depth
        return
    every = units(model)
    for unit in every:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    model._opd_gathered = 1
    try:
        yield model
    finally:
        model._opd_gathered = 0
        for unit in every:
            unit.reshard()
            if unit is not model:  # the root never reshards after its forward (FSDP2's own default)
                unit.set_reshard_after_forward(True, recurse=False)


@contextmanager
def head_bypassed(model):
    """The root forward returns final hidden states instead of logits (the head runs per chunk)."""
    head = model.get_output_embeddings()
    head.forward = _identity
    try:
        yield model
    finally:
        del head.forward  # back to the class's forward


def idle_pass(model) -> None:
    """A forward and a zero backward on one token: a rank with fewer micro-batches than the others
    still takes part in every all-gather and reduce-scatter of the step (it adds nothing)."""
    import torch

    device = next(model.parameters()).device
    with head_bypassed(model):
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False).logits
    (out.float().sum() * 0).backward()


def _identity(hidden):
    return hidden


def full_model_state(model) -> dict:
    """The gathered state dict on rank 0's CPU (a collective: every rank calls it; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """A gathered optimizer state (as `full_optimizer_state` wrote it) onto this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
