"""The OPD loop, as one linear function: sample -> score -> update -> evaluate -> log.

    for step in 1..steps:
        batch   = the student samples completions for prompts drawn from the task   (on-policy)
        scores  = the teacher scores every sampled token (full logits, no gradient)
        update  = the student lowers the per-token divergence to the teacher on its own samples
        every eval_every steps: greedy accuracy on held-out prompts; checkpoint

The baselines (`method: sft | mixed | rl | opd+rl`, see opd/train/step.py) change only who
samples and which loss is used. Each step's randomness (prompt choice, sampling) is a pure
function of (seed, step), so a run resumed from a checkpoint replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import time

import torch

from opd.backends.hf import load_model
from opd.config import DistillConfig, save_config, to_dict
from opd.errors import OpdError
from opd.eval.evaluate import evaluate
from opd.flops import ModelShape, step_flops
from opd.objectives.reward import group_advantages
from opd.objectives.select import make_objective
from opd.rollout.prompts import encode_answers, encode_prompts
from opd.rollout.filters import build_filters
from opd.rollout.records import per_teacher_logprob, rollout_views, store_rows
from opd.rollout.producer import RolloutProducer
from opd.rollout.teachers import TeacherPool, load_teachers
from opd.store.manifest import build_manifest
from opd.store.rundir import RunDir, read_jsonl
from opd.store.tracking import Tracker
from opd.store.samples import SampleStore, eval_rows
from opd.tasks.data import load_jsonl
from opd.tasks.loader import load_task
from opd.train.optim import make_optimizer
from opd.train.step import USES_REWARD, USES_TEACHER_SCORES, update


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, argv=None) -> dict:
    """Run on-policy distillation (or a baseline method) as configured; returns summary.json's content."""
    from tqdm.auto import tqdm

    wall_start = time.time()
    run = RunDir(cfg.out)
    run.create(resume)
    tracker = Tracker(run.root, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb, config=to_dict(cfg))
    method = cfg.method.name
    task = load_task(cfg.task)
    ckpt = run.latest_checkpoint() if resume else None
    student = load_model(str(ckpt[1]) if ckpt else cfg.student.model, revision=None if ckpt else cfg.student.revision,
                         trainable=True)
    tok = student.tokenizer
    teachers = TeacherPool(load_teachers(cfg, tok), task.schema, tok)
    schema_check = teachers.check_schemas(task.train, cfg.task.allow_schema_mismatch)
    teachers.settle_precision(task.train)  # dtype auto: bf16 where native and accurate (error -> manifest)
    objective = make_objective(cfg.objective, teacher_has_logits=teachers.has_logits, teacher_top_k=teachers.top_k)
    filters = build_filters(cfg.filters)
    samples = SampleStore(run.root)  # every rollout (kept or rejected, with its rule) and eval answer
    traces = load_jsonl(cfg.method.traces) if cfg.method.traces else None
    pool = traces or task.train
    train_prompts = encode_prompts(pool, task.schema, tok)
    trace_answers = encode_answers(traces, tok) if traces else None
    anchors = load_jsonl(cfg.anchors.path) if cfg.anchors.fraction > 0 else None
    anchor_ids = (encode_prompts(anchors, task.schema, tok), encode_answers(anchors, tok)) if anchors else None
    producer = RolloutProducer(cfg, pool, train_prompts, trace_answers, anchors, anchor_ids, student, teachers, tok)
    if cfg.scale.ray_address:  # rollouts and teacher passes on Ray actors; the same results as in-process
        from opd.scale.ray_workers import RayWorkers

        producer.workers = teachers.workers = RayWorkers(cfg.scale, student.name, [t for t in teachers.teachers
                                                                                 if t.loaded is not None],
                                                         tok.pad_token_id)
    eval_set = task.eval[:cfg.eval.limit] if cfg.eval.limit else task.eval
    eval_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    shapes = {"student": ModelShape.of(student.model),
              **{t.name: ModelShape.of(t.loaded.model) for t in teachers.teachers if t.loaded is not None}}

    def run_eval(model, desc):
        return evaluate(model, tok, eval_set, task.schema, task.verifier, max_new_tokens=eval_tokens,
                        batch_size=cfg.eval.batch_size, progress=progress, desc=desc)

    def teacher_accuracy() -> float | None:
        """Each held-out prompt answered by the teacher of its task tag (unknown for a remote teacher)."""
        if not teachers.has_logits:
            return None
        correct = 0
        for t in teachers.teachers:
            mine = [ex for ex in eval_set if teachers.route(ex.tag) is t]
            if mine:
                correct += evaluate(t.loaded.model, t.loaded.tokenizer, mine, t.schema or task.schema, task.verifier,
                                    max_new_tokens=eval_tokens, batch_size=cfg.eval.batch_size, progress=progress,
                                    desc=f"eval {t.name}").accuracy * len(mine)
        return correct / len(eval_set)

    optimizer, scheduler = make_optimizer(student.model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps)
    start, flops = 0, 0.0
    if ckpt:  # resume: weights came from the checkpoint; restore optimizer/scheduler and the logs
        start = ckpt[0]
        state = run.load_trainer_state(ckpt[1])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        flops = state.get("flops", 0.0)
        run.truncate_after(start)
        samples.truncate_after(start)
        before = read_jsonl(run.eval_path)[0]
        teacher_acc, student_before = before["teacher_accuracy"], before["accuracy"]
    else:
        if resume:  # --resume with no checkpoint yet: start over, dropping whatever the crashed run logged
            run.truncate_after(-1)
            samples.truncate_after(-1)
        save_config(cfg, run.root / "config.yaml")
        run.write_json("manifest.json", build_manifest(cfg, teachers, student, task, objective, filters,
                                                       schema_check, argv))
        teacher_acc = teacher_accuracy()
        result = run_eval(student.model, "eval student")
        student_before = result.accuracy
        samples.add_evals(eval_rows(0, result.records))
        run.log_eval({"step": 0, "flops": 0.0, "accuracy": student_before, "teacher_accuracy": teacher_acc,
                      "n": len(eval_set)})
        tracker.log(0, {"eval/accuracy": student_before, "eval/teacher_accuracy": teacher_acc})

    student.model.train()
    nonfinite_streak, next_eval_flops = 0, cfg.train.eval_every_flops
    if cfg.train.eval_every_flops:
        next_eval_flops = (flops // cfg.train.eval_every_flops + 1) * cfg.train.eval_every_flops
    bar = tqdm(range(start + 1, cfg.train.steps + 1), desc=method, disable=not progress,
               initial=start, total=cfg.train.steps)
    for step in bar:
        torch.manual_seed(cfg.train.seed * 1_000_003 + step)  # dropout, if the model has any
        t0 = time.perf_counter()
        rollouts = producer.get(step)                                                           # sample
        batch, examples = rollouts.batch, rollouts.examples
        lag = step - 1 - rollouts.policy_version
        t1 = time.perf_counter()
        teacher_scores, teacher_lp, teacher_names = teachers.score(batch, examples) if method in USES_TEACHER_SCORES \
            else (None, None, [teachers.route(ex.tag).name for ex in examples])                 # score
        t2 = time.perf_counter()
        views = rollout_views(batch, tok, examples, task.verifier, teacher_lp)                  # filter
        reasons = filters.apply(views)
        samples.add_rollouts(store_rows(step, rollouts.policy_version, batch, examples, views, reasons,
                                        teacher_names, rollouts.sources))
        rewards = torch.tensor([float(v.correct) for v in views])
        advantages = None
        if method in USES_REWARD:  # group baseline over the sampled rows; anchor traces get no reward term
            sampled = torch.tensor([src != "anchor" for src in rollouts.sources])
            advantages = torch.zeros(len(views))
            advantages[sampled] = group_advantages(rewards[sampled], cfg.rollout.samples_per_prompt)
        keep = torch.tensor([r is None for r in reasons])
        if method == "rl" and not advantages[keep].any():
            keep[:] = False  # every group all right or all wrong: no signal; an Adam step on zeros still moves weights
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        if keep.any():
            stats = update(student.model, optimizer, scheduler, objective, batch.rows(keep),  # update
                           teacher_scores.rows(keep) if teacher_scores is not None else None, cfg.train,
                           teacher_logprobs=teacher_lp[keep] if teacher_lp is not None else None,
                           method=method, advantages=advantages[keep] if advantages is not None else None,
                           reward_weight=cfg.method.reward_weight, stale=lag > 0 and not rollouts.teacher_sampled)
        else:  # every rollout rejected (or no reward signal): nothing to learn from, not a numeric failure
            stats = {"loss": 0.0, "grad_norm": 0.0, "update_applied": False}
            scheduler.step()  # the schedule counts steps, trained or not
        t3 = time.perf_counter()
        flops += step_flops(shapes, batch, rollouts.sources, teacher_names, generated=trace_answers is None,
                            scored=teacher_lp is not None, trained=keep if keep.any() else None)
        c_lens = batch.completion_lengths().tolist()
        record = {"step": step, **stats, "lr": lr, "flops": flops,
                  "sampled_by": "teacher" if rollouts.teacher_sampled else "student", "policy_lag": lag,
                  "train_reward": float(rewards.mean()), "anchors": rollouts.sources.count("anchor"),
                  "kept": int(keep.sum()), **per_teacher_logprob(views, teacher_names),
                  **{f"reject/{k}": n for k, n in filters.reject_counts(reasons).items()},
                  "completion_len": sum(c_lens) / len(c_lens), "truncated_frac": float(batch.truncated.float().mean()),
                  "tokens_per_s": sum(c_lens) / (t3 - t0),
                  "time_sample_s": t1 - t0, "time_score_s": t2 - t1, "time_update_s": t3 - t2}
        run.log_metrics(record)                                                                 # log
        tracker.log(step, record)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", refresh=False)
        nonfinite_streak = 0 if stats["update_applied"] or not keep.any() else nonfinite_streak + 1
        if nonfinite_streak >= cfg.train.max_nonfinite:
            raise OpdError(f"aborting at step {step}: {nonfinite_streak} consecutive non-finite losses/gradients "
                           f"(updates skipped; see {run.metrics_path}); lower train.lr or check the teacher")
        out_of_flops = bool(cfg.train.max_flops) and flops >= cfg.train.max_flops
        last_step = step == cfg.train.steps or out_of_flops
        flops_due = bool(cfg.train.eval_every_flops) and flops >= next_eval_flops
        if step % cfg.train.eval_every == 0 or last_step or flops_due:                          # evaluate
            while cfg.train.eval_every_flops and next_eval_flops <= flops:
                next_eval_flops += cfg.train.eval_every_flops
            result = run_eval(student.model, f"eval @{step}")
            run.log_eval({"step": step, "flops": flops, "accuracy": result.accuracy, "n": result.n,
                          "failures": [r for r in result.records if not r["correct"]][:20]})
            samples.add_evals(eval_rows(step, result.records))
            tracker.log(step, {"eval/accuracy": result.accuracy})
            student.model.train()
            reached = bool(cfg.train.stop_at_accuracy) and result.accuracy >= cfg.train.stop_at_accuracy
            last_step = last_step or reached
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not last_step:
            samples.flush(step)  # before the checkpoint: a resume from it redoes later rows exactly once
            run.save_checkpoint(step, student.model, tok, {"step": step, "flops": flops,
                                                            "optimizer": optimizer.state_dict(),
                                                            "scheduler": scheduler.state_dict()},
                                keep=cfg.train.keep_checkpoints)
        if last_step:
            break

    scale_counts = None
    if producer.workers is not None:
        scale_counts = {**producer.workers.counts, "rollout_workers": cfg.scale.rollout_workers,
                        "teacher_workers": cfg.scale.teacher_workers, "ray_address": cfg.scale.ray_address}
        producer.workers.close()
    final = read_jsonl(run.eval_path)[-1]
    samples.flush(final["step"])
    student.model.save_pretrained(run.root / "student", safe_serialization=True)
    tok.save_pretrained(run.root / "student")
    gap = teacher_acc - student_before if teacher_acc is not None else 0
    after = final["accuracy"]
    summary = {"method": method, "teacher_accuracy": teacher_acc, "student_accuracy_before": student_before,
               "student_accuracy_after": after, "gap_closed": (after - student_before) / gap if gap > 0 else None,
               "steps": final["step"], "flops": final.get("flops", flops), "objective": objective.name,
               "eval_n": len(eval_set), "wall_seconds": round(time.time() - wall_start, 2)}
    if scale_counts:
        summary["scale"] = scale_counts
    run.write_json("summary.json", summary)
    tracker.close()
    if cfg.logging.report:
        from opd.report.html import write_report

        write_report(run.root)  # RUN/report.html; also merges the review checklist into summary.json
    return summary
