"""The OPD loop, as named phases: build the run, start or resume, step, evaluate/checkpoint, finish.

    one step = sample -> score -> filter -> update -> log
        sample  the method's sampler writes completions (the student's own for opd: on-policy)
        score   the teacher scores every sampled token (logits as hidden states, top-k, or log-probs)
        filter  explicit rules drop rollouts; each rejection is stored with its rule
        update  the student lowers the method's loss (a per-token divergence to the teacher for opd)

Methods (opd/methods/), teachers (opd/teachers/) and rollout backends (opd/rollout/backend.py) plug in
through small interfaces; nothing here asks which one it has. Each step's randomness is a pure
function of (seed, step), so a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import io
import sys
import time

import torch

from opd.config import DistillConfig, save_config
from opd.errors import OpdError
from opd.flops import step_flops
from opd.objectives.reward import group_advantages
from opd.rollout.records import episode_means, per_teacher_logprob, rollout_views, store_rows
from opd.run import Run, State, build_run
from opd.preflight import preflight as check_before_start
from opd.schedule import Schedule
from opd.stats import wilson
from opd.store.manifest import build_manifest
from opd.store.rundir import read_jsonl
from opd.store.samples import eval_rows
from opd.teachers.cross import alignment_metrics
from opd.sharded import full_model_state, full_optimizer_state, gathered, is_sharded, load_optimizer_state
from opd.train.step import update, weighted_rows
from opd.world import World
from opd.backends.lora import save_student


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, argv=None,
            schedule: Schedule | None = None, preflight: bool = True, teacher_accuracy: float | None = None) -> dict:
    """Run on-policy distillation (or another method) as configured; returns summary.json's content.
    `schedule` (opd compare) decides when to evaluate and stop; default: train.steps / train.eval_every.
    `preflight`: check prompts, special tokens and the teacher's log-probs before step 1 (docs/preflight.md).
    `teacher_accuracy`: the teacher's held-out accuracy when already measured on this eval set (opd compare
    evaluates a fixed teacher once, not in every run); None = evaluate it at step 0.
    Launched by torchrun, each rank runs this; rank 0 writes the run and returns the summary (docs/distributed.md)."""
    wall_start = time.time()
    schedule = schedule or Schedule.from_train(cfg.train)
    world = World.from_env()  # torchrun's ranks (opd/world.py), or this process alone
    progress = progress and world.main
    try:
        run, ckpt = build_run(cfg, resume, world)
        state = resume_from(run, ckpt) if ckpt else start(run, resume, argv, progress, preflight, teacher_accuracy)
        return train(run, state, schedule, progress, wall_start)
    finally:
        world.close()


def train(run: Run, state: State, schedule: Schedule, progress: bool, wall_start: float) -> dict:
    """Step until the schedule stops, evaluating and checkpointing on the way; then finish."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=schedule.steps, initial=state.step, desc=run.method.name, disable=not progress)
    try:
        while state.step < schedule.steps:
            step, flops_before = state.step + 1, state.flops
            record = train_step(run, state, step)
            bar.update(1)
            bar.set_postfix(kl=f"{record.get('reverse_kl', record['loss']):.3f}", refresh=False)
            last = schedule.last(step, state.flops)
            if schedule.eval_due(step, flops_before, state.flops):
                accuracy = evaluate_step(run, state, step, progress)
                stop = schedule.reached(accuracy) or (cfg.train.stop_on_regression and state.below_start >= 2)
                last = last or stop
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not last:
                checkpoint(run, state)
            if last:
                break
    except KeyboardInterrupt:
        bar.close()
        interrupted(run, state)
        raise
    finally:
        bar.close()
    return finish(run, state, wall_start)


def start(run: Run, resume: bool, argv, progress: bool, preflight: bool = True,
          teacher_accuracy: float | None = None) -> State:
    """A new run (or --resume with no checkpoint yet): config, preflight, manifest, step-0 evaluation."""
    if resume:  # start over, dropping whatever the interrupted run logged
        if run.world.main:
            print(f"opd: {run.dir.root} has no checkpoint yet: starting it from step 0", file=sys.stderr)
        run.dir.truncate_after(-1)
        run.samples.truncate_after(-1)
    cfg, world = run.cfg, run.world
    if world.main:
        save_config(cfg, run.dir.root / "config.yaml")
    checks = None
    if preflight:  # quiet runs (opd compare, tests) print only the warnings; rank 0 checks for every rank
        with gathered(run.student.model):  # FSDP2: rank 0 decodes alone, with whole weights
            checks = world.on_main(lambda: check_before_start(run, out=sys.stderr if progress else io.StringIO()))
        for warning in checks["warnings"] if not progress and world.main else []:
            print(f"opd: warning: {warning}", file=sys.stderr)
    distributed = {**world.describe(),  # a collective: every rank takes part
                   "student": "fsdp2" if is_sharded(run.student.model) else "replicated"}
    if world.main:
        run.dir.write_json("manifest.json", {**build_manifest(
            cfg, run.teachers, run.student, run.task, run.method, run.objective, run.filters, run.schema_check,
            argv, backend=type(run.backend).__name__), "preflight": checks, "distributed": distributed})
    state = State()
    measured = teacher_accuracy is None
    state.teacher_accuracy = run.evaluate_teachers(progress) if measured else teacher_accuracy
    result = run.evaluate_student("eval student", progress)
    state.student_before, state.eval_n = result.accuracy, result.n
    run.samples.add_evals(eval_rows(0, result.records))
    run.dir.log_eval({"step": 0, "flops": 0.0, "accuracy": result.accuracy, "teacher_accuracy": state.teacher_accuracy,
                      "teacher_measured": measured, "n": result.n,
                      **episode_means([r.get("transcript") for r in result.records])})
    run.tracker.log(0, {"eval/accuracy": result.accuracy, "eval/teacher_accuracy": state.teacher_accuracy})
    return state


def resume_from(run: Run, ckpt) -> State:
    """Weights came from the checkpoint; restore optimizer, scheduler, counters and the logs."""
    step, path = ckpt
    saved = run.dir.load_trainer_state(path)
    fsdp = saved.get("optimizer_format") == "fsdp2-gathered"  # the optimizer state's layout
    if fsdp != is_sharded(run.student.model):
        raise OpdError(f"--resume: {path} was written {'with' if fsdp else 'without'} train.fsdp on several ranks; "
                       "resume with the same setting")
    if fsdp:
        load_optimizer_state(run.student.model, run.optimizer, saved["optimizer"])
    else:
        run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.dir.truncate_after(step)
    run.samples.truncate_after(step)
    before = read_jsonl(run.dir.eval_path)[0]
    state = State(step=step, flops=saved.get("flops", 0.0), teacher_accuracy=before["teacher_accuracy"],
                  student_before=before["accuracy"], eval_n=before["n"], last_checkpoint=step)
    state.below_start = saved.get("below_start", 0)
    ranks = saved.get("world_size", 1)
    if ranks != run.world.size and run.world.main:  # the same rows and update; only float rounding differs
        print(f"opd: warning: the checkpoint was written by {ranks} rank(s), this job has {run.world.size}: the "
              f"rollouts and updates are the same, sums may differ in rounding (exact resume needs {ranks})",
              file=sys.stderr)
    if run.world.main:
        print(f"opd: resuming {run.dir.root} from step {step} ({path})", file=sys.stderr)
    return state


def train_step(run: Run, state: State, step: int) -> dict:
    """sample -> score -> filter -> update -> log, for one step; returns the metrics record.
    Distributed (opd/world.py): each rank samples, scores and trains its share of the rows; filters,
    metrics and the store see the whole step's rows; the update is normalised by the global token count."""
    cfg, method, world = run.cfg, run.method, run.world
    torch.manual_seed(cfg.train.seed * 1_000_003 + step)  # dropout, if the model has any
    run.student.model.train()
    t0 = time.perf_counter()
    rollouts = run.producer.get(step, run.student.model)                                        # sample
    batch, examples = rollouts.batch, rollouts.examples
    lag = step - 1 - rollouts.policy_version
    t1 = time.perf_counter()
    scores, names = run.teachers.score(batch, examples) if method.uses_teacher \
        else (None, [run.teachers.route(ex.tag).name for ex in examples])                       # score
    t2 = time.perf_counter()
    views = rollout_views(batch, run.tokenizer, examples, run.task.verifier,                    # filter
                          scores.logprobs if scores is not None else None, rollouts.transcripts)
    everyone = world.gather(views)  # rules such as dedupe judge the whole step's batch, on every rank
    reasons = run.filters.apply(everyone)[world.share(len(everyone))]
    if getattr(scores, "rejects", None):  # a cross-tokenizer teacher names the rows it could not align
        reasons = [mine or r for mine, r in zip(scores.rejects, reasons)]
    rows = world.gather(store_rows(step, rollouts.policy_version, batch, examples, views, reasons, names,
                                   rollouts.sources, rollouts.turn_tokens))  # the step's rows, in single-process order
    run.samples.add_rollouts(rows)
    rewards = torch.tensor([float(v.correct) for v in views])
    advantages = reward_advantages(rewards, rollouts.sources, cfg.rollout.samples_per_prompt) \
        if method.uses_reward else None
    keep = method.trainable(torch.tensor([r is None for r in reasons]), advantages)
    kept, = world.sum(keep.sum())
    lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
    if kept:                                                                                    # update
        weighted = weighted_rows(run.objective, rollouts.sources, lag, cfg.rollout.temperature) \
            if method.uses_teacher else None
        stats = update(run.student.model, run.optimizer, run.scheduler, method, run.objective, batch.rows(keep),
                       cfg.train, scores=scores.rows(keep) if scores is not None else None,
                       advantages=advantages[keep] if advantages is not None else None,
                       weighted=weighted[keep] if weighted is not None else None,
                       rollout_temperature=cfg.rollout.temperature, vocab_size=len(run.tokenizer), world=world)
    else:  # every rollout rejected (or no learning signal): nothing to learn from, not a numeric failure
        stats = {"loss": 0.0, "grad_norm": 0.0, "update_applied": False}
        run.scheduler.step()  # the schedule counts steps, trained or not
    t3 = time.perf_counter()
    flops, = world.sum(step_flops(run.shapes, batch, rollouts.sources, names, scored=scores is not None,
                                  generated=rollouts.sampled_by != "traces", trained=keep if keep.any() else None))
    state.flops += flops
    state.step = step
    c_lens = [len(r["completion_ids"]) for r in rows]
    record = {"step": step, **stats, "lr": lr, "flops": state.flops, "sampled_by": rollouts.sampled_by,
              "policy_lag": lag, "train_reward": sum(r["correct"] for r in rows) / len(rows),
              "anchors": sum(r["source"] == "anchor" for r in rows), "kept": int(kept),
              **per_teacher_logprob(rows), **alignment_metrics(scores, world),
              **{f"reject/{k}": n for k, n in run.filters.reject_counts([r["reject_rule"] for r in rows]).items()},
              **episode_means([r["transcript"] for r in rows]),
              "completion_len": sum(c_lens) / len(c_lens), "truncated_frac": sum(r["truncated"] for r in rows) / len(rows),
              "tokens_per_s": sum(c_lens) / (t3 - t0),
              "time_sample_s": t1 - t0, "time_score_s": t2 - t1, "time_update_s": t3 - t2}
    run.dir.log_metrics(record)                                                                 # log
    run.tracker.log(step, record)
    state.nonfinite_streak = 0 if stats["update_applied"] or not kept else state.nonfinite_streak + 1
    if state.nonfinite_streak >= cfg.train.max_nonfinite:
        raise OpdError(f"aborting at step {step}: {state.nonfinite_streak} consecutive non-finite losses/gradients "
                       f"(updates skipped; see {run.dir.metrics_path}); lower train.lr or check the teacher")
    return record


def reward_advantages(rewards, sources, group_size: int) -> torch.Tensor:
    """Group baseline over the sampled rows; anchor traces get no reward term."""
    sampled = torch.tensor([src != "anchor" for src in sources])
    advantages = torch.zeros(len(sources))
    advantages[sampled] = group_advantages(rewards[sampled], group_size)
    return advantages


def evaluate_step(run: Run, state: State, step: int, progress: bool) -> float:
    """Held-out greedy accuracy, logged and stored; warns loudly on a regression below the start."""
    result = run.evaluate_student(f"eval @{step}", progress)
    run.student.model.train()
    # below the start by more than its interval: the Wilson upper bound is under the starting accuracy
    below = wilson(result.accuracy, result.n)[1] < state.student_before
    state.below_start = state.below_start + 1 if below else 0
    if state.below_start == 2 and run.world.main:
        state.regressed_at.append(step)
        what = "stopping (train.stop_on_regression)" if run.cfg.train.stop_on_regression else \
            "continuing; set train.stop_on_regression: true to stop here"
        print(f"\nopd: WARNING: held-out accuracy fell from {state.student_before:.3f} to {result.accuracy:.3f} at "
              f"step {step}, below the start by more than its 95% interval at two evaluations in a row; the "
              f"objective or train.lr is hurting the student; {what}", file=sys.stderr)
    run.dir.log_eval({"step": step, "flops": state.flops, "accuracy": result.accuracy, "n": result.n,
                      **episode_means([r.get("transcript") for r in result.records]), "below_start": below,
                      "failures": [r for r in result.records if not r["correct"]][:20]})
    run.samples.add_evals(eval_rows(step, result.records))
    run.tracker.log(step, {"eval/accuracy": result.accuracy})
    return result.accuracy


def checkpoint(run: Run, state: State) -> None:
    run.samples.flush(state.step)  # before the checkpoint: a resume from it redoes later rows exactly once
    model, extra = run.student.model, {}
    if is_sharded(model):  # FSDP2: gathered on rank 0 (a collective), the same files as unsharded
        extra = {"state_dict": full_model_state(model)}
        optimizer = {"optimizer": full_optimizer_state(model, run.optimizer), "optimizer_format": "fsdp2-gathered"}
    else:
        optimizer = {"optimizer": run.optimizer.state_dict()}
    run.dir.save_checkpoint(state.step, model, run.tokenizer,
                            {"step": state.step, "flops": state.flops, "below_start": state.below_start,
                             "world_size": run.world.size, **optimizer, "scheduler": run.scheduler.state_dict()},
                            keep=run.cfg.train.keep_checkpoints, **extra)
    state.last_checkpoint = state.step


def interrupted(run: Run, state: State) -> None:
    """Ctrl-C: keep every finished step. A checkpoint of the last one is written when a resume can start
    there (a step at a rollout-block boundary: every step when strictly on-policy)."""
    block = run.cfg.rollout.max_staleness + 1
    resumable = state.step - state.step % block
    if is_sharded(run.student.model):  # gathering needs every rank in step: keep the last checkpoint
        resumable = state.last_checkpoint
    run.samples.drop_pending_after(resumable)  # rows of the half-done step (or block) are redone on resume
    if resumable > state.last_checkpoint:
        state.step = resumable
        checkpoint(run, state)
    where = f"step {state.last_checkpoint}" if state.last_checkpoint else "nothing to keep (no step finished)"
    if run.world.main:
        print(f"\nopd: interrupted; checkpoint at {where} in {run.dir.checkpoints}; continue with "
              f"`opd distill CONFIG --resume`", file=sys.stderr)


def finish(run: Run, state: State, wall_start: float) -> dict:
    """Close workers, write the store, the student, summary.json and the report."""
    if run.workers is not None:
        run.workers.close()
    weights = full_model_state(run.student.model) if is_sharded(run.student.model) else None  # every rank
    if not run.world.main:  # rank 0 writes the store, the student, the summary and the report
        return {}
    final = read_jsonl(run.dir.eval_path)[-1]
    run.samples.flush(final["step"])
    out = run.dir.root / "student"  # a plain model folder (LoRA: merged), + the adapter in student-adapter/
    save_student(run.student.model, run.tokenizer, out, run.dir.root / "student-adapter", state_dict=weights)
    teacher, before, after = state.teacher_accuracy, state.student_before, final["accuracy"]
    gap = teacher - before if teacher is not None else 0
    summary = {"method": run.method.name, "teacher_accuracy": teacher, "student_accuracy_before": before,
               "student_accuracy_after": after, "gap_closed": (after - before) / gap if gap > 0 else None,
               "steps": final["step"], "flops": final.get("flops", state.flops), "objective": run.objective.name,
               "eval_n": len(run.eval_set), "regressed_at": state.regressed_at, "student_path": str(out),
               "wall_seconds": round(time.time() - wall_start, 2)}
    if run.workers is not None:
        summary["scale"] = {**run.workers.counts, "rollout_workers": run.cfg.scale.rollout_workers,
                            "teacher_workers": run.cfg.scale.teacher_workers, "ray_address": run.cfg.scale.ray_address}
    run.dir.write_json("summary.json", summary)
    run.tracker.close()
    if run.cfg.logging.report:
        from opd.report.html import write_report

        write_report(run.dir.root)  # RUN/report.html; also merges the review checklist into summary.json
        summary["report_path"] = str(run.dir.root / "report.html")
    return summary

