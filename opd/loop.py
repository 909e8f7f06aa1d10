"""The OPD loop, as one linear function: sample -> score -> update -> evaluate -> log.

    for step in 1..steps:
        batch   = student samples completions for prompts drawn from the task   (on-policy)
        teacher = teacher scores every sampled token (full logits, no gradient)
        update  = student lowers the per-token divergence to the teacher on its own samples
        every eval_every steps: greedy accuracy on held-out prompts; checkpoint

Each step's randomness (prompt choice, sampling) is a pure function of (seed, step), so a run
resumed from a checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import random
import time

import torch

from opd.backends.hf import check_same_vocab, load_model
from opd.config import DistillConfig, save_config
from opd.errors import OpdError
from opd.eval.evaluate import evaluate
from opd.objectives.divergences import per_token_reverse_kl
from opd.objectives.select import make_objective, token_logprobs
from opd.rollout.prompts import encode_prompts
from opd.rollout.sampler import Batch, completion_logits, generate
from opd.store.manifest import build_manifest
from opd.store.rundir import RunDir, read_jsonl
from opd.tasks.loader import load_task
from opd.train.optim import make_optimizer, optimizer_step


def step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """Independent, reproducible randomness for one step (prompt choice, token sampling)."""
    return random.Random(f"opd:{seed}:{step}"), torch.Generator().manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def score(teacher, batch: Batch) -> torch.Tensor:
    """Teacher logits [B,T,V] for every sampled completion position (float32, no gradient)."""
    return completion_logits(teacher, batch).float()


def update(student, optimizer, scheduler, objective, batch: Batch, teacher_logits, cfg) -> dict:
    """One optimizer step on the batch, in micro-batches whose losses sum to the full-batch loss."""
    mask = batch.completion_mask
    n_tokens = int(mask.sum())
    rows = batch.prompt_ids.shape[0]
    micro = cfg.micro_batch_size or rows
    total_loss, kl_sum, teacher_lp_sum = 0.0, 0.0, 0.0
    for lo in range(0, rows, micro):
        sub = Batch(*(t[lo:lo + micro] for t in (batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                                 batch.completion_mask, batch.sample_logprobs, batch.truncated)))
        s_logits = completion_logits(student, sub)
        t_logits = teacher_logits[lo:lo + micro]
        t_lp = token_logprobs(t_logits, sub.completion_ids)
        loss = objective.loss(s_logits, t_logits, t_lp, sub.completion_ids, sub.completion_mask,
                              normalizer=max(n_tokens, 1))
        loss.backward()
        m = sub.completion_mask.float()
        total_loss += loss.item()
        kl_sum += float((per_token_reverse_kl(s_logits.detach(), t_logits) * m).sum())
        teacher_lp_sum += float((t_lp * m).sum())
    grad_norm, applied = optimizer_step(student, optimizer, scheduler, cfg.grad_clip)
    return {"loss": total_loss, "reverse_kl": kl_sum / max(n_tokens, 1),
            "teacher_logprob": teacher_lp_sum / max(n_tokens, 1), "grad_norm": grad_norm,
            "update_applied": applied}


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, argv=None) -> dict:
    """Run on-policy distillation as configured; returns the summary written to summary.json."""
    from tqdm.auto import tqdm

    wall_start = time.time()
    run = RunDir(cfg.out)
    run.create(resume)
    task = load_task(cfg.task)
    teacher = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, revision=cfg.teacher.revision)
    ckpt = run.latest_checkpoint() if resume else None
    student = load_model(str(ckpt[1]) if ckpt else cfg.student.model, revision=None if ckpt else cfg.student.revision,
                         trainable=True)
    check_same_vocab(teacher.tokenizer, student.tokenizer)
    tok = student.tokenizer
    objective = make_objective(cfg.objective, teacher_has_logits=True)
    train_prompts = encode_prompts(task.train, task.schema, tok)
    eval_set = task.eval[:cfg.eval.limit] if cfg.eval.limit else task.eval
    eval_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens

    def run_eval(model, desc):
        return evaluate(model, tok, eval_set, task.schema, task.verifier, max_new_tokens=eval_tokens,
                        batch_size=cfg.eval.batch_size, progress=progress, desc=desc)

    optimizer, scheduler = make_optimizer(student.model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps)
    start = 0
    if ckpt:  # resume: weights came from the checkpoint; restore optimizer/scheduler and the logs
        start = ckpt[0]
        state = run.load_trainer_state(ckpt[1])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run.truncate_after(start)
        before = read_jsonl(run.eval_path)[0]
        teacher_acc, student_before = before["teacher_accuracy"], before["accuracy"]
    else:
        save_config(cfg, run.root / "config.yaml")
        run.write_json("manifest.json", build_manifest(cfg, teacher, student, task, objective, argv))
        teacher_acc = run_eval(teacher.model, "eval teacher").accuracy
        student_before = run_eval(student.model, "eval student").accuracy
        run.log_eval({"step": 0, "accuracy": student_before, "teacher_accuracy": teacher_acc, "n": len(eval_set)})

    student.model.train()
    last_eval, nonfinite_streak = None, 0
    bar = tqdm(range(start + 1, cfg.train.steps + 1), desc="opd", disable=not progress,
               initial=start, total=cfg.train.steps)
    for step in bar:
        rng, gen = step_rng(cfg.train.seed, step)
        torch.manual_seed(cfg.train.seed * 1_000_003 + step)  # dropout, if the model has any
        t0 = time.perf_counter()
        picks = [rng.randrange(len(train_prompts)) for _ in range(cfg.rollout.batch_size)]
        prompts = [train_prompts[i] for i in picks for _ in range(cfg.rollout.samples_per_prompt)]
        batch = generate(student.model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                         generator=gen)                                                        # sample
        t1 = time.perf_counter()
        teacher_logits = score(teacher.model, batch)                                            # score
        t2 = time.perf_counter()
        stats = update(student.model, optimizer, scheduler, objective, batch, teacher_logits, cfg.train)  # update
        t3 = time.perf_counter()
        lengths = batch.completion_lengths().float()
        record = {"step": step, **stats, "lr": scheduler.get_last_lr()[0],
                  "completion_len": float(lengths.mean()), "truncated_frac": float(batch.truncated.float().mean()),
                  "tokens_per_s": float(lengths.sum()) / (t3 - t0),
                  "time_sample_s": t1 - t0, "time_score_s": t2 - t1, "time_update_s": t3 - t2}
        run.log_metrics(record)                                                                 # log
        nonfinite_streak = 0 if stats["update_applied"] else nonfinite_streak + 1
        if nonfinite_streak >= cfg.train.max_nonfinite:
            raise OpdError(f"aborting at step {step}: {nonfinite_streak} consecutive non-finite losses/gradients "
                           f"(updates skipped; see {run.metrics_path}); lower train.lr or check the teacher")
        bar.set_postfix(loss=f"{stats['loss']:.3f}", kl=f"{stats['reverse_kl']:.3f}", refresh=False)
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:                         # evaluate
            last_eval = run_eval(student.model, f"eval @{step}")
            run.log_eval({"step": step, "accuracy": last_eval.accuracy, "n": last_eval.n,
                          "failures": [r for r in last_eval.records if not r["correct"]][:20]})
            student.model.train()
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            run.save_checkpoint(step, student.model, tok, {"step": step, "optimizer": optimizer.state_dict(),
                                                            "scheduler": scheduler.state_dict()},
                                keep=cfg.train.keep_checkpoints)

    student_after = last_eval.accuracy if last_eval else read_jsonl(run.eval_path)[-1]["accuracy"]
    student.model.save_pretrained(run.root / "student", safe_serialization=True)
    tok.save_pretrained(run.root / "student")
    gap = teacher_acc - student_before
    summary = {"teacher_accuracy": teacher_acc, "student_accuracy_before": student_before,
               "student_accuracy_after": student_after, "gap_closed": (student_after - student_before) / gap if gap > 0 else None,
               "steps": cfg.train.steps, "objective": objective.name, "eval_n": len(eval_set),
               "wall_seconds": round(time.time() - wall_start, 2)}
    run.write_json("summary.json", summary)
    return summary
