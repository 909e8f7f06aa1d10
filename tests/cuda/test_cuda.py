"""GPU-only checks (`pytest -m cuda`; skipped without CUDA). bench/gpu_check.py runs them on its GPU
machine and records the counts in results/gpu.json.

The models are bench/gpu_check.py's tiny Qwen3s (random weights, a word-level vocabulary of 1024, so
rollouts rarely hit EOS). In float32 a GPU run must reproduce the CPU run: the sampler draws its
uniforms on the CPU in float64 whatever the device, so the same seed samples the same tokens, and
every metric then agrees to float32 rounding. bfloat16 is held to its own tolerances.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from bench.gpu_check import (SMOKE_STUDENT, SMOKE_TEACHER, deep_merge, memory_estimate, word_tokenizer,
                             write_model, write_task)
from opd.config import load_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT_TOKENS = 16
MATCHED = ("loss", "reverse_kl", "teacher_logprob", "grad_norm")


def build(root, student_spec=SMOKE_STUDENT, teacher_spec=SMOKE_TEACHER, prompt_tokens=PROMPT_TOKENS):
    tok = word_tokenizer(student_spec["vocab_size"])
    return {"student": write_model(student_spec, tok, root / "student", seed=0)["path"],
            "teacher": write_model(teacher_spec, tok, root / "teacher", seed=1)["path"],
            "task": write_task(root, tok, prompt_tokens=prompt_tokens, n_train=64), "tokenizer": tok}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cuda"))


def config(world, out, **sections):
    """float32 on the CPU unless `sections` say otherwise (nested dicts merged over these)."""
    train, held_out = world["task"]
    base = {"student": {"model": str(world["student"]), "device": "cpu"},
            "teacher": {"model": str(world["teacher"]), "device": "cpu", "dtype": "float32"},
            "task": {"train": str(train), "eval": str(held_out)},
            "objective": {"name": "reverse_kl"},
            "rollout": {"batch_size": 8, "max_new_tokens": 16},
            # a small lr: Adam turns float32 noise in a near-zero gradient into a whole lr-sized step
            "train": {"steps": 3, "lr": 1e-4, "warmup_steps": 0, "precision": "float32", "eval_every": 10 ** 6,
                      "checkpoint_every": 0},
            "eval": {"limit": 1, "max_new_tokens": 4},
            "logging": {"report": False},
            "out": str(out)}
    return load_config(None, base=deep_merge(base, sections))


def run(cfg) -> dict:
    """distill, then what the comparisons need: metrics, the sampled ids per step, the manifest."""
    import pyarrow.parquet as pq

    from opd.loop import distill
    from opd.store.rundir import read_jsonl

    distill(cfg, progress=False)
    root = Path(cfg.out)
    parts = sorted((root / "samples" / "rollouts").glob("*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p, columns=["step", "completion_ids"]).to_pylist()]
    return {"metrics": read_jsonl(root / "metrics.jsonl"), "ids": rows,
            "manifest": json.loads((root / "manifest.json").read_text()), "root": root}


def assert_same_run(got: dict, want: dict, rel: float = 1e-3) -> None:
    assert got["ids"] == want["ids"], "the same seed sampled different tokens on another device"
    assert len(got["metrics"]) == len(want["metrics"])
    for g, w in zip(got["metrics"], want["metrics"]):
        assert g["completion_len"] == w["completion_len"]
        for key in MATCHED:
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-6), f"step {g['step']} {key}"


@pytest.fixture(scope="module")
def cpu_runs(world, tmp_path_factory):
    """The float32 CPU reference runs: full fine-tuning and LoRA."""
    root = tmp_path_factory.mktemp("cpu-runs")
    return {lora: run(config(world, root / f"lora{lora}", student={"lora": {"r": lora}})) for lora in (0, 4)}


@pytest.mark.parametrize("student,teacher", [("cuda", "cuda"), ("cpu", "cuda:0"), ("cuda:0", "cpu")])
def test_float32_run_on_the_gpu_matches_the_cpu_run(world, cpu_runs, tmp_path, student, teacher):
    got = run(config(world, tmp_path / "run", student={"device": student}, teacher={"device": teacher}))
    assert_same_run(got, cpu_runs[0])
    placed = {who: got["manifest"][who]["device"] for who in ("student", "teacher")}
    assert placed == {"student": str(torch.device(student if student != "cuda" else "cuda:0")),
                      "teacher": str(torch.device(teacher if teacher != "cuda" else "cuda:0"))}


def test_lora_run_on_the_gpu_matches_the_cpu_run(world, cpu_runs, tmp_path):
    got = run(config(world, tmp_path / "run", student={"device": "cuda", "lora": {"r": 4}},
                     teacher={"device": "cuda"}))
    assert_same_run(got, cpu_runs[4])
    assert (got["root"] / "student-adapter").is_dir() and (got["root"] / "student").is_dir()
    assert got["manifest"]["student"]["trainable_params"] < got["manifest"]["student"]["num_params"] / 2


def test_bfloat16_run_on_the_gpu_is_close_to_the_float32_cpu_run(world, cpu_runs, tmp_path):
    """precision auto on a GPU = bfloat16 weights with float32 masters; the teacher in bfloat16. Samples
    may differ from float32 at near-ties, so step 1's batch statistics are compared loosely."""
    got = run(config(world, tmp_path / "run", student={"device": "cuda"}, teacher={"device": "cuda",
                                                                                    "dtype": "bfloat16"},
                     train={"precision": "auto"}))
    assert got["manifest"]["student"]["train_precision"] == "bfloat16_weights"
    assert got["manifest"]["student"]["dtype"] == got["manifest"]["teacher"]["dtype"] == "bfloat16"
    first, want = got["metrics"][0], cpu_runs[0]["metrics"][0]
    for key in ("reverse_kl", "teacher_logprob"):
        assert first[key] == pytest.approx(want[key], rel=0.1), key
    assert all(r["update_applied"] and torch.isfinite(torch.tensor(r["loss"])) for r in got["metrics"])


def test_sampling_is_the_same_on_the_cpu_and_the_gpu(world):
    from opd.backends.hf import load_model
    from opd.rollout.backend import HFBackend
    from opd.rollout.prompts import encode_prompts
    from opd.tasks.data import load_jsonl
    from opd.tasks.schema import PromptSchema

    cpu, gpu = (load_model(str(world["student"]), device=d) for d in ("cpu", "cuda"))  # float32 both
    tok = cpu.tokenizer
    prompts = encode_prompts(load_jsonl(world["task"][0])[:16], PromptSchema.from_spec("{prompt}"), tok)
    for greedy in (False, True):
        a, b = (HFBackend(m.model, tok.eos_token_id, tok.pad_token_id).generate(
            prompts, max_new_tokens=24, greedy=greedy, seed=3) for m in (cpu, gpu))
        assert b.completion_ids.device.type == "cpu"  # a Batch leaves the sampler on the CPU
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
        torch.testing.assert_close(b.sample_logprobs, a.sample_logprobs, rtol=0, atol=1e-4)


def test_a_bfloat16_teacher_on_the_gpu_scores_within_the_auto_threshold(world):
    """teacher.dtype auto keeps bfloat16 only within BF16_MAX_ERROR nats of float32; a GPU must meet it."""
    from opd.backends.hf import load_model
    from opd.rollout.prompts import encode_prompts
    from opd.rollout.sampler import generate
    from opd.tasks.data import load_jsonl
    from opd.tasks.schema import PromptSchema
    from opd.teachers.local import BF16_MAX_ERROR, score

    cpu = load_model(str(world["teacher"]), dtype="float32")
    gpu = load_model(str(world["teacher"]), dtype="bfloat16", device="cuda")
    tok = cpu.tokenizer
    prompts = encode_prompts(load_jsonl(world["task"][0])[:8], PromptSchema.from_spec("{prompt}"), tok)
    batch = generate(cpu.model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=16,
                     generator=torch.Generator().manual_seed(0))
    sel = batch.completion_mask.bool()
    error = (score(gpu.model, batch).logprobs - score(cpu.model, batch).logprobs).cpu()[sel].abs().max()
    assert float(error) <= BF16_MAX_ERROR


# big enough that the estimated parts (weights, optimizer state, activations, the logits chunk)
# dwarf the allocator's fixed costs, small enough for seconds on any GPU
MEDIUM_STUDENT = dict(SMOKE_STUDENT, vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64)
MEDIUM_TEACHER = dict(MEDIUM_STUDENT, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                      tie_word_embeddings=False)


def test_peak_memory_is_within_the_estimate(tmp_path):
    """bench/gpu_check.py's memory estimate (the table of docs/real_models.md) against the allocator's peak
    on a run whose largest phase is the update, as it is for Qwen3-0.6B <- Qwen3-8B."""
    from opd.loop import distill

    prompt_tokens = 64
    medium = build(tmp_path, MEDIUM_STUDENT, MEDIUM_TEACHER, prompt_tokens)
    cfg = config(medium, tmp_path / "run", student={"device": "cuda"},
                 teacher={"device": "cuda", "dtype": "bfloat16"},
                 rollout={"batch_size": 32, "max_new_tokens": 64, "kv_cache_gib": 1.0},
                 train={"precision": "auto", "steps": 2, "micro_batch_tokens": 2048, "logits_chunk": 2 ** 22})
    estimate = memory_estimate(MEDIUM_STUDENT, MEDIUM_TEACHER, cfg, prompt_tokens)
    assert estimate["peak_phase"] == "update"
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    distill(cfg, progress=False)
    peak = torch.cuda.max_memory_allocated() - before
    ratio = peak / estimate["peak"]
    assert 0.6 <= ratio <= 1.25, f"peak {peak / 2**20:.0f} MiB vs estimate {estimate['peak'] / 2**20:.0f} MiB " \
                                 f"({ratio:.2f}x); parts: " + \
                                 ", ".join(f"{k} {v / 2**20:.0f}" for k, v in estimate["parts"].items())
