"""GPU verification at real model sizes: a Qwen3-0.6B student distilled from a Qwen3-8B teacher.

    python bench/gpu_check.py              # one H200 / H100, <= 8 minutes: writes results/gpu.json
    python bench/gpu_check.py --smoke      # the same code on tiny configs, on the CPU, < 1 minute
    python bench/gpu_check.py --estimate   # the memory table of docs/real_models.md

Both models are built from their published configs (the literal hyperparameters below) with random
weights, saved as safetensors and loaded by `opd.loop.distill` like any hub model: nothing is
downloaded. Each variant runs the documented config (examples/qwen3_0.6b_from_8b.yaml, full
fine-tuning; ..._lora.yaml, LoRA r=16) on 64 synthetic prompts of 256 tokens, 512 sampled tokens
each, full-vocabulary reverse KL. Random weights sample EOS with probability ~1/151936 per token, so
nearly every rollout runs its full length: what a throughput figure wants. Steps are timed from
opd's own metrics.jsonl (2 warm-up steps, then 10); peak memory is torch's allocator peak; mfu is
opd's model FLOPs (opd/flops.py) per second over the GPU's dense bf16 peak. Then `pytest -m cuda`
runs in a child process and its counts are recorded.

Time plan on one H200 (a prediction; the JSON has the measurement): building and saving the models
~1 min (16 GB of teacher safetensors); per variant ~40 s of loading and hashing, 12 steps of ~6-10 s,
~10 s to finish; the cuda tests ~1 min. The guard gives each variant an equal share of what is left
of --budget-s (less the tests' reserve), ends a variant between steps when its share is spent (the
JSON says so) and interrupts one that overruns its share by the finish margin.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's opd
    sys.path.insert(0, str(ROOT))

from opd.schedule import Schedule  # noqa: E402

EXAMPLES = {"full": ROOT / "examples" / "qwen3_0.6b_from_8b.yaml",
            "lora": ROOT / "examples" / "qwen3_0.6b_from_8b_lora.yaml"}
GIB = 2 ** 30

# The published configs (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-8B): 596,049,920 and
# 8,190,735,360 parameters. Qwen3 has no attention bias, q/k RMSNorm, untied heads from 4B up.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                  tie_word_embeddings=True, use_sliding_window=False, max_window_layers=28)
QWEN3_8B = dict(QWEN3_0_6B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, tie_word_embeddings=False, max_window_layers=36)
HUB_SPECS = {"Qwen/Qwen3-0.6B": QWEN3_0_6B, "Qwen/Qwen3-8B": QWEN3_8B}
# --smoke (and tests/cuda): the same architecture at a few MB; the teacher untied like Qwen3-8B
SMOKE_STUDENT = dict(QWEN3_0_6B, vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     max_window_layers=2)
SMOKE_TEACHER = dict(SMOKE_STUDENT, hidden_size=128, intermediate_size=384, head_dim=32, tie_word_embeddings=False)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; most specific name first.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))

# Live [chunk, vocab] tensors at the loss's peak (opd/train/step.py + the reverse KL in
# opd/objectives/divergences.py), bytes per logit: the student's bf16 logits (2) and their float32
# copy (4), the teacher's float32 logits (4), and five float32 intermediates: log p_S, log p_T, p_S,
# the log-ratio and its product with p_S (20).
LOSS_BYTES_PER_LOGIT = 2 + 4 + 4 + 5 * 4
# [rows, vocab] per decode step (opd/rollout/sampler.py): float32 logits and log-probs, then the
# float64 copy, probabilities and CDF the sampler inverts
DECODE_BYTES_PER_LOGIT = 4 + 4 + 3 * 8


@dataclass(frozen=True)
class Plan:
    student: dict
    teacher: dict
    rows: int  # prompts per step
    prompt_tokens: int
    new_tokens: int
    warmup: int  # steps not timed (kernel selection, allocator growth)
    timed: int
    budget_s: float  # the whole script
    tests_s: float  # kept back for `pytest -m cuda`
    finish_s: float  # a run's end after its last step (evaluation, saving the student)
    device: str
    n_train: int  # distinct prompts the rows are drawn from


GPU_PLAN = Plan(QWEN3_0_6B, QWEN3_8B, rows=64, prompt_tokens=256, new_tokens=512, warmup=2, timed=10,
                budget_s=480, tests_s=90, finish_s=30, device="cuda", n_train=256)
SMOKE_PLAN = Plan(SMOKE_STUDENT, SMOKE_TEACHER, rows=8, prompt_tokens=32, new_tokens=32, warmup=2, timed=10,
                  budget_s=60, tests_s=15, finish_s=3, device="cpu", n_train=64)


# ----------------------------------------------------------------------------- models, tokenizer, task

def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids: <pad> <bos> <eos> <unk>, then t4, t5, ...
    split on whitespace, so a prompt of n words is n + 1 tokens (BOS first) and every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from opd.backends.hf import SPECIAL_TOKENS

    words = list(SPECIAL_TOKENS) + [f"t{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def qwen3_config(spec: dict, tokenizer=None):
    from transformers import Qwen3Config

    special = {} if tokenizer is None else dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen3Config(**spec, **special)
    # transformers 5 moves rope_theta into rope_parameters, 4.x keeps the attribute: check it landed
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    assert theta == spec["rope_theta"], f"rope_theta {theta} != {spec['rope_theta']}"
    return config


def write_model(spec: dict, tokenizer, out: Path, *, seed: int = 0, device: str = "cpu") -> dict:
    """A random-weight Qwen3 of `spec`, initialised on `device` in bf16 and saved as a hub folder would be
    (bf16 safetensors + tokenizer). Returns its path, opd's FLOP shape and its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.flops import ModelShape

    torch.manual_seed(seed)
    with torch.device(device):  # an 8B model is initialised on the GPU in a second, on the CPU in minutes
        model = AutoModelForCausalLM.from_config(qwen3_config(spec, tokenizer), dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"path": out, "shape": ModelShape.of(model), "params": sum(p.numel() for p in model.parameters())}
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return info


def write_task(root: Path, tokenizer, *, prompt_tokens: int, n_train: int, seed: int = 0) -> tuple[Path, Path]:
    """train/eval JSONL of random-word prompts, each exactly `prompt_tokens` tokens (checked by encoding)."""
    from opd.tasks.data import Example, save_jsonl

    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    words = [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer)) if i not in special]
    prompts = [" ".join(rng.choice(words) for _ in range(prompt_tokens - 1)) for _ in range(n_train + 1)]
    lengths = {len(tokenizer(p).input_ids) for p in prompts}
    if lengths != {prompt_tokens}:
        raise RuntimeError(f"synthetic prompts encode to {sorted(lengths)} tokens, expected {prompt_tokens}")
    paths = root / "train.jsonl", root / "eval.jsonl"
    save_jsonl(paths[0], [Example(p, words[0]) for p in prompts[:-1]])
    save_jsonl(paths[1], [Example(prompts[-1], words[0])])
    return paths


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` merged into `base` (in place), section by section; an empty mapping replaces."""
    for key, value in extra.items():
        base[key] = deep_merge(base.get(key) or {}, value) if isinstance(value, dict) and value else value
    return base


def variant_config(example: Path, *, student: Path, teacher: Path, task: tuple[Path, Path], out: Path, plan: Plan):
    """The documented config with the bench's models, prompts, batch and step count; nothing else changes."""
    import yaml

    from opd.config import load_config

    data = yaml.safe_load(example.read_text())
    data["task"] = {"train": str(task[0]), "eval": str(task[1]), "prompt_schema": "{prompt}", "verifier": "exact"}
    deep_merge(data, {
        "student": {"model": str(student), "device": plan.device},
        "teacher": {"model": str(teacher), "device": plan.device},
        "rollout": {"batch_size": plan.rows, "max_new_tokens": plan.new_tokens},
        "train": {"steps": plan.warmup + plan.timed, "eval_every": 10 ** 9, "checkpoint_every": 0},
        "eval": {"limit": 1, "batch_size": 1, "max_new_tokens": 1},  # the start/end evaluations are not timed
        "logging": {"report": False},
        "out": str(out),
    })
    return load_config(None, base=data)


# ----------------------------------------------------------------------------- memory estimate

def count_params(spec: dict, lora_r: int = 0, targets="all-linear") -> tuple[int, int]:
    """(parameters, LoRA adapter parameters) of the architecture, counted on the meta device (no memory).
    "all-linear" is every linear but the output head (peft's rule)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config(spec))
    head = model.get_output_embeddings()
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
               and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)]
    return sum(p.numel() for p in model.parameters()), lora_r * sum(m.in_features + m.out_features for m in linears)


def _dims(spec: dict) -> tuple[int, int, int, int]:
    """hidden, query width, key/value width, MLP width."""
    return (spec["hidden_size"], spec["num_attention_heads"] * spec["head_dim"],
            spec["num_key_value_heads"] * spec["head_dim"], spec["intermediate_size"])


def layer_saved_bytes(spec: dict) -> int:
    """Bytes one decoder layer keeps per token for the backward pass, bf16, as transformers' Qwen3 layer
    computes it: each RMSNorm upcasts to float32 and keeps that copy and its normalised bf16 value.
    `measured_layer_saved_bytes` checks it against autograd (every run records both)."""
    h, q, kv, inter = _dims(spec)
    norms = 2 * h * (4 + 2 + 2)  # two layer norms: float32 input, normalised bf16, output (the projections' input)
    qk_norms = (q + kv) * (4 + 2)  # q/k norms: float32 input, normalised bf16 (rotary keeps nothing)
    # rotary q; k and v repeated to every head (a padding mask keeps sdpa off its GQA path); the attention
    # output (laid out so that it is the o projection's input without a copy)
    attention = 4 * q * 2
    mlp = 4 * inter * 2  # gate, SiLU(gate), up, their product
    return norms + qk_norms + attention + mlp


def measured_layer_saved_bytes(spec: dict, device: str = "cpu", rows: int = 2, tokens: int = 64) -> int:
    """What autograd keeps per token for one bf16 decoder layer of `spec`'s widths, with a padding mask:
    the distinct non-parameter storages saved by a 2-layer body's forward, minus a 1-layer body's."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, spec["vocab_size"], (rows, tokens), device=device)
    mask = torch.ones_like(ids)
    mask[0, :tokens // 8] = 0  # left padding, as opd's batches have

    def saved(layers: int) -> int:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(qwen3_config(dict(spec, num_hidden_layers=layers,
                                                                       max_window_layers=layers)),
                                                     dtype=torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return sum(storages.values())

    return (saved(2) - saved(1)) // (rows * tokens)


def forward_working_bytes(spec: dict) -> int:
    """Bytes per token live at once in a no-grad forward: at the MLP, the residual, the normalised input,
    SiLU(gate), up and their product."""
    h, _, _, inter = _dims(spec)
    return 2 * (2 * h + 3 * inter)


def memory_estimate(student: dict, teacher: dict, cfg, prompt_tokens: int) -> dict:
    """Peak GPU memory of one OPD step for `cfg` (a DistillConfig) with rows of `prompt_tokens` + max_new_tokens,
    by part, for train.precision bfloat16_weights (what `auto` is on a GPU). The phases (sample, score,
    update, optimizer step) do not overlap, so the peak is the persistent state plus the largest phase.
    Activations of a LoRA student are counted as full fine-tuning's (an upper bound: frozen weights keep
    fewer inputs). Bytes throughout."""
    from opd.errors import OpdError

    if cfg.train.precision not in ("auto", "bfloat16_weights"):
        raise OpdError("the estimate covers train.precision bfloat16_weights (auto on a GPU) only")
    rows = cfg.rollout.batch_size * cfg.rollout.samples_per_prompt
    new = cfg.rollout.max_new_tokens
    seq = prompt_tokens + new
    lora = cfg.student.lora
    s_params, adapters = count_params(student, lora.r, lora.target_modules)
    t_params, _ = count_params(teacher)
    trainable = adapters or s_params
    h_s, q_s, kv_s, i_s = _dims(student)
    layers, vocab = student["num_hidden_layers"], student["vocab_size"]

    kv_row = seq * layers * 2 * kv_s * 2  # bf16 keys and values of one row
    group = min(rows, max(1, int(cfg.rollout.kv_cache_gib * GIB // kv_row)))  # rows decoded at once
    micro = min(rows, max(1, cfg.train.micro_batch_tokens // seq) if cfg.train.micro_batch_tokens else rows,
                cfg.train.micro_batch_size or rows)
    saved = (layers * 2 * h_s + layer_saved_bytes(student)) if cfg.train.gradient_checkpointing \
        else layers * layer_saved_bytes(student)
    saved += h_s * (4 + 2 + 2)  # the final norm
    chunk = min(max(1, cfg.train.logits_chunk // vocab), micro * new)
    kept = rows * seq * teacher["hidden_size"] * 2  # the teacher's last hidden states (a view of the whole sequence)
    parts = {
        "teacher weights (bf16)": 2 * t_params,
        "student weights (bf16)": 2 * (s_params + adapters),
        "float32 master weights": 4 * trainable,
        "AdamW moments (2 x float32)": 8 * trainable,
        "sample: KV cache": group * kv_row,
        "sample: fused q/k/v, gate/up weights": layers * h_s * (q_s + 2 * kv_s + 2 * i_s) * 2,
        "sample: prefill / decode-step working set": max(group * prompt_tokens * (forward_working_bytes(student)
                                                                                  + kv_row // seq),
                                                         group * vocab * DECODE_BYTES_PER_LOGIT),
        "score: teacher forward working set": rows * seq * forward_working_bytes(teacher),
        "teacher hidden states kept for the loss": kept,
        "update: gradients (bf16 + float32 copy)": 6 * trainable,
        "update: activations of one micro-batch": micro * seq * saved,
        "update: one logits chunk": chunk * vocab * LOSS_BYTES_PER_LOGIT,
        "optimizer step: AdamW temporaries": 4 * trainable,
    }
    persistent = sum(list(parts.values())[:4])
    phases = {
        "sample": sum(v for k, v in parts.items() if k.startswith("sample:")),
        "score": parts["score: teacher forward working set"] + kept,
        "update": kept + sum(v for k, v in parts.items() if k.startswith("update:")),
        "optimizer step": parts["update: gradients (bf16 + float32 copy)"] + parts["optimizer step: AdamW temporaries"],
    }
    top = max(phases, key=phases.get)
    return {"parts": parts, "persistent": persistent, "phases": phases, "peak_phase": top,
            "peak": persistent + phases[top],
            "shape": {"rows": rows, "tokens_per_row": seq, "micro_batch_rows": micro, "decode_rows": group,
                      "activation_gib_per_1k_tokens": round(1000 * saved / GIB, 3),
                      "logits_chunk_tokens": chunk, "student_params": s_params, "teacher_params": t_params,
                      "trainable_params": trainable}}


def estimate_table(estimates: dict[str, dict]) -> str:
    """A Markdown table (GiB) with one column per estimate."""
    names = list(estimates)
    first = estimates[names[0]]
    lines = ["| part | " + " | ".join(names) + " |", "|---" + "|--:" * len(names) + "|"]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for part in first["parts"]:
        row(part, [f"{e['parts'][part] / GIB:.2f}" for e in estimates.values()])
    row("**persistent** (weights, masters, moments)", [f"**{e['persistent'] / GIB:.1f}**" for e in estimates.values()])
    for phase in first["phases"]:
        row(f"phase: {phase}", [f"{e['phases'][phase] / GIB:.1f}" for e in estimates.values()])
    row("**peak** (persistent + largest phase)",
        [f"**{e['peak'] / GIB:.1f}** ({e['peak_phase']})" for e in estimates.values()])
    shape = ("micro_batch_rows", "activation_gib_per_1k_tokens", "decode_rows", "logits_chunk_tokens",
             "trainable_params")
    for key in shape:
        row(key, [f"{e['shape'][key]:,}" for e in estimates.values()])
    return "\n".join(lines)


def print_estimates(prompt_tokens: int) -> None:
    """The tables of docs/real_models.md: examples/*.yaml as written (and with gradient checkpointing),
    then this script's own workload."""
    import copy

    from opd.config import load_config

    def spec(name):
        if name not in HUB_SPECS:
            raise SystemExit(f"no literal config for {name!r} (known: {', '.join(HUB_SPECS)})")
        return HUB_SPECS[name]

    full, lora = (load_config(EXAMPLES[k]) for k in ("full", "lora"))
    checkpointed = copy.deepcopy(full)
    checkpointed.train.gradient_checkpointing = True
    columns = {"full fine-tuning": full, "full, gradient checkpointing": checkpointed,
               f"LoRA r={lora.student.lora.r}": lora}
    print(f"## examples/*.yaml, rows of {prompt_tokens} prompt + {full.rollout.max_new_tokens} new tokens (GiB)\n")
    print(estimate_table({n: memory_estimate(spec(c.student.model), spec(c.teacher.model), c, prompt_tokens)
                          for n, c in columns.items()}))
    print(f"\n## bench/gpu_check.py: {GPU_PLAN.rows} rows of {GPU_PLAN.prompt_tokens} + {GPU_PLAN.new_tokens} "
          "tokens (GiB)\n")
    for cfg in (full, lora):
        cfg.rollout.batch_size, cfg.rollout.max_new_tokens = GPU_PLAN.rows, GPU_PLAN.new_tokens
    print(estimate_table({n: memory_estimate(GPU_PLAN.student, GPU_PLAN.teacher, c, GPU_PLAN.prompt_tokens)
                          for n, c in (("full fine-tuning", full), (f"LoRA r={lora.student.lora.r}", lora))}))


# ----------------------------------------------------------------------------- timing a variant

class Overtime(Exception):
    """A variant ran past its hard deadline."""


@contextmanager
def hard_deadline(seconds: float):
    """Raise Overtime in the main thread after `seconds` (a step that never ends cannot eat the budget)."""
    def fire(signum, frame):
        raise Overtime(f"interrupted after {seconds:.0f} s (its share of the time budget plus the finish margin)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Guard(Schedule):
    """train.steps, or fewer: the loop asks `last` after every step, so the run ends there (and finishes
    normally) once the deadline has passed or `check` names a reason."""

    deadline: float = math.inf
    check: Callable[[int], str | None] | None = None
    label: str = ""
    stopped: str | None = None
    ends: dict = field(default_factory=dict)  # step -> time.monotonic() when it finished

    def last(self, step: int, flops: float) -> bool:
        if step not in self.ends:  # the loop asks twice per step; the first call is the step's end
            self.ends[step] = now = time.monotonic()
            took = f"{now - self.ends[step - 1]:.2f} s" if step - 1 in self.ends else "(first)"
            print(f"[gpu_check] {self.label} step {step}/{self.steps} {took}", file=sys.stderr, flush=True)
            if self.stopped is None and step < self.steps:
                if now >= self.deadline:
                    self.stopped = f"time guard: stopped after step {step} of {self.steps}"
                elif self.check is not None:
                    self.stopped = self.check(step)
        return self.stopped is not None or super().last(step, flops)


def peak_bf16(name: str | None) -> tuple[float | None, str]:
    for key, tflops in BF16_PEAK_TFLOPS:
        if name and key in name:
            return tflops, f"table entry {key!r}: NVIDIA datasheet, dense bf16 tensor core"
    return None, f"no bf16 peak known for {name!r}: mfu not computed"


def gpu_allocated_peak() -> int:
    import torch

    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def summarize(records: list[dict], plan: Plan, guard: Guard, shapes: dict, peak_tflops: float | None,
              lora: bool) -> dict:
    """Timed steps (after the warm-up) from metrics.jsonl: s/step, phases, tokens/s, FLOPs, mfu."""
    from opd.flops import generation_flops, sequence_flops

    flops = [r["flops"] - (records[i - 1]["flops"] if i else 0.0) for i, r in enumerate(records)]
    timed = [(r, f) for r, f in zip(records[plan.warmup:], flops[plan.warmup:]) if r["step"] - 1 in guard.ends]
    if not timed:
        return {"timed_steps": 0}
    wall = [guard.ends[r["step"]] - guard.ends[r["step"] - 1] for r, _ in timed]
    s_step = statistics.mean(wall)
    phase_s = {p: statistics.mean(r[f"time_{p}_s"] for r, _ in timed) for p in ("sample", "score", "update")}
    completion = statistics.mean(r["completion_len"] for r, _ in timed)
    sampled = completion * plan.rows
    both = sampled + plan.rows * plan.prompt_tokens  # prompt + completion: what the teacher and the update read
    step_flops = statistics.mean(f for _, f in timed)
    p, c = [plan.prompt_tokens] * plan.rows, [completion] * plan.rows
    phase_flops = {"sample": generation_flops(shapes["student"], p, c),
                   "score": sequence_flops(shapes["teacher"], p, c),
                   "update": sequence_flops(shapes["student"], p, c, train=True)}

    def mfu(flop, seconds):
        return round(flop / seconds / (peak_tflops * 1e12), 4) if peak_tflops else None

    out = {"timed_steps": len(timed), "s_per_step": round(s_step, 4),
           "s_per_step_median": round(statistics.median(wall), 4),
           "s_per_step_min_max": [round(min(wall), 4), round(max(wall), 4)],
           "phase_s": {k: round(v, 4) for k, v in phase_s.items()},
           "tokens_per_s": {"step (sampled tokens)": round(sampled / s_step, 1),
                            "sample (sampled tokens)": round(sampled / phase_s["sample"], 1),
                            "score (prompt + completion tokens)": round(both / phase_s["score"], 1),
                            "update (prompt + completion tokens)": round(both / phase_s["update"], 1)},
           "completion_len": round(completion, 2),
           "truncated_frac": round(statistics.mean(r["truncated_frac"] for r, _ in timed), 4),
           "reverse_kl_last": timed[-1][0].get("reverse_kl"),
           "model_flops_per_step": step_flops,
           "mfu": mfu(step_flops, s_step),
           "mfu_by_phase": {k: mfu(phase_flops[k], phase_s[k]) for k in phase_s},
           # opd's FLOPs for the step vs the phases recomputed from the mean lengths: ~1 unless rows differ
           "flops_check": round(sum(phase_flops.values()) / step_flops, 4) if step_flops else None}
    if lora:
        out["mfu_note"] = ("opd/flops.py counts the update as 3 forward passes; a LoRA update computes no "
                           "gradient for the frozen weights (~2 passes), so this mfu is an upper bound")
    return out


def run_variant(name: str, cfg, plan: Plan, shapes: dict, teacher_bytes: int, soft: float, hard: float,
                peak_tflops: float | None, estimate: dict | None) -> dict:
    """One `distill` of `cfg`, stopped by the guard; its timing, memory and any error, never raising."""
    from opd.loop import distill
    from opd.store.rundir import read_jsonl

    gpu = plan.device != "cpu"

    def on_gpu(step: int) -> str | None:  # a CPU fallback would take hours a step: stop at once
        if gpu and step == 1 and gpu_allocated_peak() < teacher_bytes:
            return (f"models are not on the GPU: peak allocation {gpu_allocated_peak() / GIB:.1f} GiB after "
                    f"step 1 is below the teacher's weights ({teacher_bytes / GIB:.1f} GiB)")
        return None

    guard = Guard(steps=cfg.train.steps, eval_every=cfg.train.eval_every, deadline=soft, check=on_gpu, label=name)
    if gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    error, t0 = None, time.monotonic()
    try:
        with hard_deadline(hard - t0):
            distill(cfg, progress=False, schedule=guard)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON; the next variant still runs
        traceback.print_exc()
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
    result = {"error": error, "stopped_early": guard.stopped, "wall_s": round(time.monotonic() - t0, 1),
              "steps_done": len(guard.ends)}
    run = Path(cfg.out)
    lora = bool(cfg.student.lora.r)
    if lora and not error and not (run / "student-adapter").is_dir():
        result["error"] = "student.lora is set but the run wrote no student-adapter/: LoRA was not applied"
    result.update(summarize(read_jsonl(run / "metrics.jsonl"), plan, guard, shapes, peak_tflops, lora))
    if (run / "manifest.json").exists():  # where and in what precision opd says the models ran
        manifest = json.loads((run / "manifest.json").read_text())
        result["placement"] = {who: {k: manifest[who].get(k) for k in keys} for who, keys in (
            ("student", ("device", "dtype", "train_precision", "trainable_params")),
            ("teacher", ("device", "dtype", "precision")))}
    if gpu:
        result["peak_gpu_memory_gib"] = round(gpu_allocated_peak() / GIB, 2)
        result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        result["allocated_before_gib"] = round(allocated_before / GIB, 2)  # > 0: the previous variant leaked
    if estimate is not None:
        result["estimate_peak_gib"] = round(estimate["peak"] / GIB, 2)
        result["estimate_peak_phase"] = estimate["peak_phase"]
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- cuda tests, environment

def junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        kind = "failed" if "failure" in kinds else "errors" if "error" in kinds else \
            "skipped" if "skipped" in kinds else "passed"
        counts[kind] += 1
        if kind in ("failed", "errors"):
            message = next(c for c in case if c.tag in ("failure", "error")).get("message", "")
            failures.append(f"{case.get('classname')}::{case.get('name')}: {' '.join(message.split())[:300]}")
    return {**counts, "failures": failures}


def run_cuda_tests(timeout_s: float) -> dict:
    """`pytest -m cuda` over the whole suite, in a child process; the counts from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="opd-cuda-tests-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"command": "pytest -m cuda", "error": f"timed out after {timeout_s:.0f} s"}
        out = {"command": "pytest -m cuda", "exit_code": proc.returncode, "wall_s": round(time.monotonic() - t0, 1)}
        if xml.exists():
            out.update(junit_counts(xml))
        if proc.returncode not in (0, 5):  # 5: no test collected
            out["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return out


def environment(gpu: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from opd.store.manifest import code_version

    def package(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if gpu else None,
           **{name: package(name) for name in ("transformers", "peft", "accelerate", "tokenizers")},
           "opd": code_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "memory_gib": round(props.total_memory / GIB, 1), "capability": f"{props.major}.{props.minor}"}
    return env


# ----------------------------------------------------------------------------- main

def check(plan: Plan, out: Path, workdir: str | None) -> dict:
    start = time.monotonic()
    deadline = start + plan.budget_s
    gpu = plan.device != "cpu"
    env = environment(gpu)
    tflops, source = peak_bf16(env.get("gpu", {}).get("name")) if gpu else (None, "CPU smoke run: no GPU peak")
    result = {"what": "bench/gpu_check.py: OPD at real model sizes (random weights), "
                      + ("GPU" if gpu else "CPU smoke"),
              "environment": env, "bf16_peak": {"tflops": tflops, "source": source},
              "workload": {"student": "Qwen3-0.6B config" if gpu else "tiny Qwen3", "teacher":
                           "Qwen3-8B config" if gpu else "tiny Qwen3 (untied)", "weights": "random, bf16 safetensors",
                           "vocab": plan.student["vocab_size"], "rows": plan.rows, "prompt_tokens": plan.prompt_tokens,
                           "max_new_tokens": plan.new_tokens, "objective": "reverse_kl (full vocabulary)",
                           "warmup_steps": plan.warmup, "timed_steps": plan.timed, "configs": {
                               k: str(p.relative_to(ROOT)) for k, p in EXAMPLES.items()}},
              "variants": {}}
    with tempfile.TemporaryDirectory(prefix="opd-gpu-check-", dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        print("[gpu_check] building models and prompts", file=sys.stderr, flush=True)
        tokenizer = word_tokenizer(plan.student["vocab_size"])
        models = {"student": write_model(plan.student, tokenizer, tmp / "student", seed=0, device=plan.device),
                  "teacher": write_model(plan.teacher, tokenizer, tmp / "teacher", seed=1, device=plan.device)}
        task = write_task(tmp, tokenizer, prompt_tokens=plan.prompt_tokens, n_train=plan.n_train)
        result["build_s"] = round(time.monotonic() - t0, 1)
        try:  # the activation count of the memory estimate against autograd, on this device
            result["estimate_check"] = {"layer_saved_bytes_per_token": layer_saved_bytes(plan.student),
                                        "measured": measured_layer_saved_bytes(plan.student, plan.device),
                                        "device": plan.device}
        except Exception as exc:  # noqa: BLE001 - a side check must not cost the GPU run
            result["estimate_check"] = {"error": f"{type(exc).__name__}: {exc}"}
        result["workload"]["params"] = {k: m["params"] for k, m in models.items()}
        teacher_bytes = 2 * models["teacher"]["params"]
        for i, (name, example) in enumerate(EXAMPLES.items()):
            cfg = variant_config(example, student=models["student"]["path"], teacher=models["teacher"]["path"],
                                 task=task, out=tmp / "runs" / name, plan=plan)
            estimate = memory_estimate(plan.student, plan.teacher, cfg, plan.prompt_tokens) if gpu else None
            lora = cfg.student.lora
            adapters = count_params(plan.student, lora.r, lora.target_modules)[1]  # opd counts them as parameters
            student = models["student"]["shape"]
            shapes = {"teacher": models["teacher"]["shape"],
                      "student": replace(student, params=student.params + adapters)}
            now = time.monotonic()
            share = (deadline - plan.tests_s - now) / (len(EXAMPLES) - i)
            result["variants"][name] = run_variant(name, cfg, plan, shapes, teacher_bytes,
                                                   soft=now + share - plan.finish_s, hard=now + share,
                                                   peak_tflops=tflops, estimate=estimate)
            result["variants"][name]["config"] = {
                "lora_r": cfg.student.lora.r, "micro_batch_tokens": cfg.train.micro_batch_tokens,
                "gradient_checkpointing": cfg.train.gradient_checkpointing, "logits_chunk": cfg.train.logits_chunk,
                "kv_cache_gib": cfg.rollout.kv_cache_gib, "precision": cfg.train.precision,
                "teacher_dtype": cfg.teacher.dtype}
    result["cuda_tests"] = run_cuda_tests(timeout_s=max(deadline - time.monotonic(), 30.0))
    used = time.monotonic() - start
    result["time_guard"] = {"budget_s": plan.budget_s, "used_s": round(used, 1), "within_budget": used <= plan.budget_s,
                            "stopped_early": {n: v["stopped_early"] for n, v in result["variants"].items()
                                              if v.get("stopped_early")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (< 1 minute): the same code path")
    mode.add_argument("--estimate", action="store_true", help="print the memory estimate of examples/*.yaml and exit")
    parser.add_argument("--out", type=Path,
                        help="JSON to write (default: results/gpu.json; --smoke: runs/gpu_check_smoke.json)")
    parser.add_argument("--budget-s", type=float, help="time budget of the whole script (default: 480; --smoke: 60)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="--estimate: prompt length assumed (default 512)")
    parser.add_argument("--workdir", help="where the models are written (default: the system temp dir; ~18 GB on GPU)")
    args = parser.parse_args(argv)
    if args.estimate:
        print_estimates(args.prompt_tokens)
        return 0
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if args.budget_s:
        plan = replace(plan, budget_s=args.budget_s)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); results/gpu.json not written. "
                  "Run it on a GPU machine, or --smoke / --estimate here.", file=sys.stderr)
            return 2
    out = args.out or ROOT / ("runs/gpu_check_smoke.json" if args.smoke else "results/gpu.json")
    result = check(plan, out, args.workdir)
    print(json.dumps({n: {k: v.get(k) for k in ("error", "stopped_early", "timed_steps", "s_per_step", "mfu",
                                                 "peak_gpu_memory_gib")} for n, v in result["variants"].items()},
                     indent=2))
    tests = result["cuda_tests"]
    print(f"cuda tests: {tests.get('passed')} passed, {tests.get('failed')} failed, {tests.get('errors')} errors, "
          f"{tests.get('skipped')} skipped; {result['time_guard']['used_s']} s; wrote {out}")
    failed = any(v.get("error") for v in result["variants"].values()) or tests.get("failed") or tests.get("errors") \
        or "error" in tests
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
