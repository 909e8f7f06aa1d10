"""opd vs TRL GKDTrainer: time per training step and peak memory on one small on-policy workload (CPU).

Workload W: teacher Qwen3 4 layers / hidden 256 / intermediate 1024 / 4 heads / 2 KV heads, student
2 / 128 / 512 / 4 / 2, vocabulary 64, random init from a seed; 32 prompts of 16 random tokens; 64
sampled tokens each (temperature 1, top_k 0, top_p 1, no EOS: eos is an id outside the vocabulary /
None, so nothing stops early); fully on-policy (TRL lmbda=1); full-vocabulary reverse KL on completion
tokens (TRL beta=1); AdamW lr 1e-4, grad clip 1.0, constant lr. W-V32k: the same with a 32,000-token
vocabulary (peak memory).

Every run is a child process of this script (`--child JSON`) with its thread count set through both
torch.set_num_threads and OMP_NUM_THREADS/MKL_NUM_THREADS; runs alternate between opd and TRL.

    python bench/vs_trl.py [--out results/bench.json] [--quick]

Needs `pip install "trl>=1.0,<2"` (TRL side only; the opd child never imports trl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from efficiency import child_peaks, efficiency  # noqa: E402  (bench/ is this script's folder)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TEACHER = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
               num_key_value_heads=2)
STUDENT = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2)
BATCH, PROMPT_LEN, NEW_TOKENS, LR, CLIP, SEED = 32, 16, 64, 1e-4, 1.0, 0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ----------------------------------------------------------------------------------------- child side
def build_models(vocab: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def cfg(shape):
        return Qwen3Config(vocab_size=vocab, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                           max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                           **shape)

    torch.manual_seed(SEED)
    teacher = Qwen3ForCausalLM(cfg(TEACHER)).float()
    student = Qwen3ForCausalLM(cfg(STUDENT)).float()
    teacher.eval()
    student.train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def child_opd(spec: dict) -> dict:

    import torch

    from opd.objectives.select import make_objective
    from opd.config import ObjectiveConfig, TrainConfig
    from opd.rollout.sampler import generate
    from opd.batch import make_sft_batch
    from opd.methods import make_method
    from opd.methods.base import MethodOptions
    from opd.teachers.local import auto_precision, score
    from opd.train.optim import make_optimizer
    from opd.train.step import update

    rss_imports = rss_mb()
    vocab = spec["vocab"]
    teacher, student = build_models(vocab)
    # opd's default teacher dtype (auto), decided on a probe of 8 random prompts + 16-token answers
    g = torch.Generator().manual_seed(SEED)
    probe = make_sft_batch(torch.randint(0, vocab, (8, PROMPT_LEN), generator=g).tolist(),
                           torch.randint(0, vocab, (8, 16), generator=g).tolist(), pad_id=0)
    precision = auto_precision(teacher, probe)
    objective = make_objective(ObjectiveConfig(name="reverse_kl"))
    method = make_method(MethodOptions())
    optimizer, scheduler = make_optimizer(student, lr=LR)
    train_cfg = TrainConfig(grad_clip=CLIP)  # opd defaults (whole-batch micro-batch, default logits_chunk)
    total = spec["warmup"] + spec["steps"]
    times, split, tokens = [], [], []
    for step in range(total):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        prompts = torch.randint(0, vocab, (BATCH, PROMPT_LEN), generator=g).tolist()
        batch = generate(student, prompts, eos_id=vocab, pad_id=0, max_new_tokens=NEW_TOKENS,  # eos never sampled
                         temperature=1.0, generator=g)
        t1 = time.perf_counter()
        teacher_scores = score(teacher, batch)
        t2 = time.perf_counter()
        stats = update(student, optimizer, scheduler, method, objective, batch, train_cfg, scores=teacher_scores)
        t3 = time.perf_counter()
        del teacher_scores
        times.append(t3 - t0)
        split.append((t1 - t0, t2 - t1, t3 - t2))
        tokens.append(int(batch.completion_mask.sum()))
    out = {"times": times[spec["warmup"]:], "tokens_per_step": tokens[-1], "rss_after_imports_mb": rss_imports,
           "teacher_precision": precision,
           "last_loss": stats["loss"], "last_grad_norm": stats["grad_norm"],
           "params": {"teacher": n_params(teacher), "student": n_params(student)}}
    if spec.get("instrument"):
        kept = split[spec["warmup"]:]
        out["split_s"] = {k: statistics.median(x[i] for x in kept) for i, k in enumerate(("sample", "score", "update"))}
    return out


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rss_imports = rss_mb()
    vocab = spec["vocab"]
    teacher, student = build_models(vocab)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t1")),
        pad_token="t0", unk_token="t1")
    total = spec["warmup"] + spec["steps"]
    g = torch.Generator().manual_seed(SEED)
    rows = torch.randint(0, vocab, (total * BATCH, PROMPT_LEN + NEW_TOKENS), generator=g).tolist()
    data = Dataset.from_dict({"ids": rows})

    def collate(examples):
        ids = torch.tensor([e["ids"] for e in examples])
        prompts = ids[:, :PROMPT_LEN]
        labels = ids.clone()
        labels[:, :PROMPT_LEN] = -100  # a dataset completion of the same length as the sampled one: the
        return {"prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts),  # loss normaliser
                "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}  # (num_items) matches

    variant = spec["variant"]
    speed = {"trl_fp32": dict(bf16=False, gradient_checkpointing=False),
             "trl_bf16": dict(bf16=True, use_cpu=True, gradient_checkpointing=False),
             "trl_defaults": dict(use_cpu=True)}[variant]  # defaults: bf16=True + checkpointing; CPU needs use_cpu
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="gkd_bench_"), lmbda=1.0, beta=1.0, temperature=1.0,
                     max_new_tokens=NEW_TOKENS, learning_rate=LR, max_grad_norm=CLIP, lr_scheduler_type="constant",
                     weight_decay=0.0, per_device_train_batch_size=BATCH, max_steps=total, logging_steps=10_000,
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=SEED,
                     max_length=PROMPT_LEN + NEW_TOKENS, **speed)

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):  # end-to-end step intervals: data, generate, loss, backward, optimizer
            self.marks.append(time.perf_counter())

    timer = Timer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=tok, data_collator=collate, callbacks=[timer])
    seen = {}
    inner = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):
        if not seen:
            seen["completion_tokens"] = int((inputs["labels"] != -100).sum())
            seen["seq_len"] = int(inputs["input_ids"].shape[1])
        loss = inner(model, inputs, *a, **k)
        seen["last_loss"] = float(loss.detach())
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    return {"times": steps[spec["warmup"]:], "tokens_per_step": seen.get("completion_tokens"),
            "seq_len": seen.get("seq_len"), "last_loss": seen.get("last_loss"), "rss_after_imports_mb": rss_imports,
            "settings": {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                         "use_cache_in_generate": trainer.generation_config.use_cache,
                         "eos_token_id": trainer.generation_config.eos_token_id, "optim": str(args.optim)},
            "params": {"teacher": n_params(teacher), "student": n_params(student)}}


def child_main(spec: dict, result_path: str):
    import torch

    torch.set_num_threads(spec["threads"])
    child = {"opd": child_opd, "peaks": child_peaks}.get(spec["variant"], child_trl)  # peaks: efficiency.py
    out = child(spec)
    out.update(spec=spec, peak_rss_mb=rss_mb(), torch_threads=torch.get_num_threads())
    with open(result_path, "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------- parent side
def run_child(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--result", path], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"child failed: {spec}")
    with open(path) as f:
        out = json.load(f)
    os.unlink(path)
    if spec["variant"] == "peaks":
        return out
    out["wall_s"] = time.time() - t0
    out["median_s"] = statistics.median(out["times"])
    out["tokens_per_s"] = out["tokens_per_step"] / out["median_s"]
    print(f"  {spec['variant']:13s} V={spec['vocab']:<6d} threads={spec['threads']} rep={spec['rep']} "
          f"median {out['median_s']:.3f} s/step  {out['tokens_per_s']:7.0f} tok/s  peak RSS {out['peak_rss_mb']:.0f} MB"
          f"  ({out['wall_s']:.0f} s)", flush=True)
    return out


def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "opd"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    ap.add_argument("--quick", action="store_true", help="N=5 steps, one repetition, W-V32k: opd and TRL's best only (< 2 min)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(json.loads(a.child), a.result)

    start = time.time()
    warmup, steps, reps = (3, 5, 1) if a.quick else (3, 20, 2)
    big_warmup, big_steps = (0, 1) if a.quick else (1, 3)  # W-V32k is for memory; quick keeps one step
    variants = ["opd", "trl_fp32", "trl_bf16", "trl_defaults"]
    runs = []
    print(f"workload W (V=64), {'quick' if a.quick else 'full'}: {warmup} warm-up + {steps} timed steps, {reps} rep(s)")
    for rep in range(reps):
        for threads in (1, 2):
            order = variants if (rep + threads) % 2 == 0 else variants[::-1]
            order = [v for pair in zip(order[:2], order[2:]) for v in pair]  # interleave opd with TRL variants
            for v in order:
                runs.append(run_child(dict(variant=v, vocab=64, threads=threads, warmup=warmup, steps=steps, rep=rep,
                                           instrument=a.quick and v == "opd")))
    if a.quick:  # --quick reads the split off its own opd run (timers only) to stay under 2 minutes
        instr = next(r for r in runs if r["spec"]["variant"] == "opd" and r["spec"]["threads"] == 1)
    else:
        print("opd, instrumented (sample / score / update split), W, 1 thread")
        instr = run_child(dict(variant="opd", vocab=64, threads=1, warmup=warmup, steps=steps, rep=0, instrument=True))

    def med(variant, threads, vocab=64):
        xs = [r["median_s"] for r in runs if r["spec"]["variant"] == variant and r["spec"]["threads"] == threads
              and r["spec"]["vocab"] == vocab]
        return statistics.mean(xs) if xs else None

    best = {t: min(("trl_fp32", "trl_bf16"), key=lambda v: med(v, t)) for t in (1, 2)}
    print(f"W-V32k (V=32000), 1 thread, {big_warmup} warm-up + {big_steps} timed steps: peak memory")
    big = []
    for v in ("opd", best[1]) if a.quick else ("opd", "trl_fp32", "trl_bf16"):
        big.append(run_child(dict(variant=v, vocab=32000, threads=1, warmup=big_warmup, steps=big_steps, rep=0)))
    runs.extend(big)

    peaks = {t: run_child(dict(variant="peaks", threads=t)) for t in (1, 2)}
    print(f"matmul peaks, GFLOP/s: {peaks}")

    def rss(variant, vocab):
        xs = [r["peak_rss_mb"] for r in runs if r["spec"]["variant"] == variant and r["spec"]["vocab"] == vocab]
        return max(xs) if xs else None

    summary = {}
    for vocab, ths in ((64, (1, 2)), (32000, (1,))):
        for t in ths:
            for v in variants:
                m = med(v, t, vocab)
                if m is None:
                    continue
                tok = BATCH * NEW_TOKENS
                summary[f"V{vocab}/t{t}/{v}"] = {"s_per_step": m, "tokens_per_s": tok / m,
                                                  "peak_rss_mb": max(r["peak_rss_mb"] for r in runs
                                                                     if r["spec"]["variant"] == v
                                                                     and r["spec"]["threads"] == t
                                                                     and r["spec"]["vocab"] == vocab)}
    result = {
        "benchmark": "opd vs TRL GKDTrainer, on-policy reverse-KL distillation step (CPU)",
        "mode": "quick" if a.quick else "full",
        "workload": {"teacher": TEACHER, "student": STUDENT, "vocab": 64, "vocab_memory_run": 32000, "batch": BATCH,
                     "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "early_stop": False, "lmbda": 1.0, "beta": 1.0, "lr": LR, "grad_clip": CLIP,
                     "params": instr["params"]},
        "timing": {"warmup_steps": warmup, "timed_steps": steps, "repetitions": reps,
                   "statistic": "median s/step per run; mean over repetitions",
                   "memory_run_steps": big_warmup + big_steps},
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "versions": versions(),
        "trl_best_variant": {f"{t}_thread": best[t] for t in (1, 2)},
        "ratio_time": med("opd", 1) / med(best[1], 1),
        "ratio_time_2threads": med("opd", 2) / med(best[2], 2),
        "ratio_time_vs_trl_defaults": med("opd", 1) / med("trl_defaults", 1),
        "ratio_time_vs_trl_defaults_2threads": med("opd", 2) / med("trl_defaults", 2),
        "ratio_mem": rss("opd", 32000) / rss(best[1], 32000),
        "ratio_mem_W": rss("opd", 64) / rss(best[1], 64),
        "opd_time_split_s_1thread": instr["split_s"],
        "opd_instrumented_run_s_per_step": instr["median_s"],
        "opd_teacher_precision": instr["teacher_precision"],
        "efficiency": efficiency(instr["params"], BATCH * (PROMPT_LEN + NEW_TOKENS), peaks, {t: med("opd", t) for t in (1, 2)},
                                 {t: med(best[t], t) for t in (1, 2)}),
        "summary": summary,
        "runs": runs if a.quick else runs + [instr],
        "bench_wall_s": None,
    }
    result["bench_wall_s"] = time.time() - start

    print()
    print(f"{'run':28s} {'s/step':>8s} {'tok/s':>8s} {'peak RSS MB':>12s}")
    for k, s in summary.items():
        print(f"{k:28s} {s['s_per_step']:8.3f} {s['tokens_per_s']:8.0f} {s['peak_rss_mb']:12.0f}")
    sp = instr["split_s"]
    print(f"\nopd split (1 thread): sample {sp['sample']:.3f} s, score {sp['score']:.3f} s, update {sp['update']:.3f} s")
    print(f"TRL best: {best}")
    for k in ("ratio_time", "ratio_time_2threads", "ratio_time_vs_trl_defaults", "ratio_mem", "ratio_mem_W"):
        print(f"{k:28s} {result[k]:.3f}")
    for t in (1, 2):
        e = result["efficiency"][f"{t}_thread"]
        print(f"efficiency {t} thread(s): {e['achieved_gflops']:.1f} GFLOP/s = {e['share_of_fp32_peak']:.0%} of fp32 peak, "
              f"{e['share_of_bf16_peak']:.0%} of bf16 peak; FLOP floor {e['floor_s_per_step']:.3f} s "
              f"({e['floor_ratio_vs_trl_best']:.2f} of TRL best)")
    print(f"teacher precision: {result['opd_teacher_precision']}")
    print(f"total {result['bench_wall_s']:.0f} s")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
