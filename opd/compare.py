"""`opd compare`: every method from the same student start, on the same prompts, at equal compute,
evaluated on the same grids.

1. The grids are fixed before any measured run. The step grid is the base config's `train.eval_every`;
   the FLOP grid's spacing is OPD's projected FLOPs for its `train.steps` / `evals_per_run`, projected
   from a short OPD pilot run (`pilot_steps`; skipped when `eval_every_flops` is given). Every run of
   every method then evaluates after each step on the step grid and after each step whose cumulative
   FLOPs cross a multiple of the spacing (`opd.schedule.Schedule`), so no method is measured at a finer
   resolution than another. compare's knobs go into the Schedule, never into `train:`.
2. OPD runs first: the target is 90% of the teacher's accuracy, and RL gets `rl_budget` x the most FLOPs
   any OPD seed needed to reach it (the upper end of its bracket; x its spent FLOPs if none did),
   and stops at the target (`rl_stop_at_target`: its later accuracy does not change "FLOPs to target").
3. The teacher does not change, so it is evaluated once (in the pilot, else in the first run) and its
   accuracy handed to every later run (eval.jsonl's step 0 says `teacher_measured: false` there).

"FLOPs to target" of a run is a bracket [FLOPs of the last evaluation below the target, FLOPs of the
first at or above it]: the run crossed the target somewhere in between ([0, 0] when it started there;
None when it never reached it). `ratio_to_opd` = [lo, hi] per method, from the seed means of the
bracket ends: lo = mean(method's lower ends) / mean(OPD's upper ends), hi = mean(method's upper ends) /
mean(OPD's lower ends). Means, not per-seed pairs: seeds of different methods are not paired runs, so a
per-seed ratio would mix seed noise into what is a resolution bound; the per-seed brackets are in
compare.json. A run that never reached the target counts with its last evaluation's FLOPs as its lower
end (it needed more) and an unbounded upper end; an unbounded or undefined end is written as None.
Final accuracies come with 95% Wilson intervals (`opd.stats.wilson`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from opd.errors import OpdError
from opd.schedule import Schedule
from opd.stats import wilson
from opd.store.rundir import read_jsonl

RL_STEPS = 10**7  # RL runs until its FLOP budget (or the target) ends it


def curve_of(run_dir: Path) -> list[list[float]]:
    return [[e["flops"], e["accuracy"]] for e in read_jsonl(Path(run_dir) / "eval.jsonl")]


def bracket(curve, target: float) -> list[float] | None:
    """[FLOPs at the last evaluation below `target`, FLOPs at the first at or above it]; None if never."""
    for i, (flops, acc) in enumerate(curve):
        if acc >= target:
            return [curve[i - 1][0] if i else flops, flops]
    return None


def flops_to(curve, target: float) -> float | None:
    """Cumulative FLOPs at the first evaluation at or above `target` (None if never)."""
    b = bracket(curve, target)
    return None if b is None else b[1]


def bounds(curve, target: float) -> tuple[float, float]:
    """What the evaluations say about a run's FLOPs to target: its bracket, or (its last evaluation's
    FLOPs, inf) when it never reached the target."""
    b = bracket(curve, target)
    return (b[0], b[1]) if b else (curve[-1][0], math.inf)


def _ratio(a: float, b: float) -> float | None:
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def ratio_range(curves, opd_curves, target: float) -> list[float | None]:
    """[lo, hi] of (method's mean FLOPs to target) / (OPD's), from the bracket ends (see the module
    docstring); None where a bound is unbounded or undefined."""
    def mean(xs):
        return sum(xs) / len(xs)

    lo_m, hi_m = zip(*(bounds(c, target) for c in curves))
    lo_o, hi_o = zip(*(bounds(c, target) for c in opd_curves))
    out = [_ratio(mean(lo_m), mean(hi_o)), _ratio(mean(hi_m), mean(lo_o))]
    return [r if r is not None and math.isfinite(r) else None for r in out]


def flop_grid(pilot_flops: float, pilot_steps: int, steps: int, evals_per_run: int) -> float:
    """FLOP grid spacing: OPD's FLOPs for `steps`, projected from a pilot, over `evals_per_run` evaluations."""
    if pilot_steps <= 0 or pilot_flops <= 0:
        raise OpdError("opd compare: the OPD pilot spent no FLOPs; cannot place the FLOP grid")
    return pilot_flops / pilot_steps * steps / evals_per_run


def with_overrides(cfg, overrides: list[str]):
    from opd.config import DistillConfig, apply_override, from_dict, to_dict, validate

    data = to_dict(cfg)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(from_dict(DistillConfig, data))


REFERENCE = "opd"  # the method every other is compared with; it runs first and sets the budgets


def budgeted(method: str) -> bool:
    """A reward-only baseline (no teacher): it gets a FLOP budget of rl_budget x the reference's FLOPs to
    target, so "never reached" means something, and may stop once it reaches the target."""
    from opd.methods import METHODS

    return METHODS[method].uses_reward and not METHODS[method].uses_teacher


def compare(base, methods: list[str], seeds: int, out: str | Path, *, rl_budget: float = 10.0,
            evals_per_run: int = 20, method_overrides: dict | None = None, rl_stop_at_target: bool = True,
            eval_every_flops: float | None = None, pilot_steps: int = 5, progress: bool = True) -> dict:
    """Run `methods` x `seeds` from `base` (a DistillConfig); write compare.json and compare.png in `out`.

    `method_overrides`: per-method `--set`-style assignments, e.g. {"rl": ["train.lr=1e-4"]}.
    `eval_every_flops`: the FLOP grid's spacing (default: placed by an OPD pilot of `pilot_steps`).
    """
    from opd.loop import distill  # the loop loads torch and models; the bracket arithmetic above does not
    from opd.methods import METHODS

    reference = REFERENCE

    overrides = method_overrides or {}
    unknown = [m for m in [*methods, *overrides] if m not in METHODS]
    if unknown:
        raise OpdError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if any(a.strip().startswith("train.eval_every") for a in sum(overrides.values(), [])):
        raise OpdError("the step grid is shared by every method: set train.eval_every with --set, not --method-set")
    if seeds <= 0 or evals_per_run <= 0:
        raise OpdError("--seeds and evals_per_run must be positive")
    out = Path(out)
    step_grid = base.train.eval_every

    def configure(method: str, seed: int, name: str):
        cfg = with_overrides(copy.deepcopy(base), [f"method.name={method}", f"train.seed={seed}",
                                                    *overrides.get(method, [])])
        cfg.out = str(out / "runs" / name)
        cfg.train.checkpoint_every = 0
        cfg.logging.report = False  # one report per run would only slow the comparison down
        return cfg

    def teacher_accuracy(summary) -> float:
        if summary["teacher_accuracy"] is None:
            raise OpdError("opd compare needs a local teacher: its accuracy sets the target")
        return summary["teacher_accuracy"]

    teacher_acc = pilot = None
    if eval_every_flops is None:  # the pilot places the FLOP grid before any measured run
        cfg = configure(reference, 0, "pilot")
        steps, n = cfg.train.steps, min(pilot_steps, cfg.train.steps)
        teacher_acc = teacher_accuracy(distill(cfg, progress=progress, schedule=Schedule(steps=n, eval_every=n)))
        last = read_jsonl(Path(cfg.out) / "eval.jsonl")[-1]
        eval_every_flops = flop_grid(last["flops"], last["step"], steps, evals_per_run)
        pilot = {"steps": last["step"], "flops": last["flops"], "run": cfg.out}
    target = None if teacher_acc is None else 0.9 * teacher_acc
    order = [reference] + [m for m in methods if m != reference]  # the reference first: it sets the budget
    results: dict = {m: {"final_accuracy": [], "final_interval": [], "flops_to_target": [], "flops_spent": [],
                         "curve": [], "runs": []} for m in order}
    rl_max_flops = None
    for method in order:
        for seed in range(seeds):
            cfg = configure(method, seed, f"{method}-seed{seed}")
            if budgeted(method):
                schedule = Schedule(steps=RL_STEPS, eval_every=step_grid, eval_every_flops=eval_every_flops,
                                    max_flops=rl_max_flops, stop_at_accuracy=target if rl_stop_at_target else 0.0)
            else:
                schedule = Schedule(steps=cfg.train.steps, eval_every=step_grid, eval_every_flops=eval_every_flops)
            summary = distill(cfg, progress=progress, schedule=schedule, teacher_accuracy=teacher_acc)
            if target is None:  # no pilot: the first OPD run measures the teacher
                teacher_acc = teacher_accuracy(summary)
                target = 0.9 * teacher_acc
            curve = curve_of(Path(cfg.out))
            n = summary.get("eval_n") or read_jsonl(Path(cfg.out) / "eval.jsonl")[-1]["n"]
            entry = results[method]
            entry["final_accuracy"].append(summary["student_accuracy_after"])
            entry["final_interval"].append(list(wilson(summary["student_accuracy_after"], n)))
            entry["flops_to_target"].append(bracket(curve, target))
            entry["flops_spent"].append(curve[-1][0])
            entry["curve"].append(curve)
            entry["runs"].append(cfg.out)
        if method == reference:
            reached = [b[1] for b in results[reference]["flops_to_target"] if b is not None]
            # 0 when OPD started at the target: a budget of 0 would mean "none", so fall back to its spend
            rl_max_flops = rl_budget * (max(reached, default=0.0) or max(results[reference]["flops_spent"]))
    for method, entry in results.items():
        entry["ratio_to_opd"] = None if method == reference else \
            ratio_range(entry["curve"], results[reference]["curve"], target)
    if reference not in methods:
        results.pop(reference)
    report = {"teacher_accuracy": teacher_acc, "target": target, "seeds": seeds,
              "grid": {"eval_every": step_grid, "eval_every_flops": eval_every_flops, "pilot": pilot},
              "rl_stopped_at_target": rl_stop_at_target and any(map(budgeted, methods)), "method_overrides": overrides,
              "rl_budget_flops": rl_max_flops if any(map(budgeted, methods)) else None, "methods": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "compare.png")
    return report


def plot(report: dict, path: Path) -> None:
    """Accuracy vs cumulative FLOPs (log): one line per method (mean over seeds), band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_curves(report, ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(report: dict, ax) -> None:
    """compare.json's curves on a matplotlib axis (also used by figures that add panels of their own)."""
    import numpy as np

    for method, entry in report["methods"].items():
        curves = entry["curve"]
        grid = np.unique(np.concatenate([np.array(c)[:, 0] for c in curves]))
        grid = grid[grid > 0]  # log axis: the start (0 FLOPs) is the first evaluation's left edge
        # carry each seed's last evaluated accuracy forward onto the common grid
        ys = np.stack([np.interp(grid, np.array(c)[:, 0], np.array(c)[:, 1], right=c[-1][1]) for c in curves])
        line, = ax.plot(grid, ys.mean(0), label=method)
        ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
    ax.axhline(report["target"], ls="--", c="gray", lw=1, label="90% of teacher")
    ax.axhline(report["teacher_accuracy"], ls=":", c="black", lw=1, label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative FLOPs (generation + teacher scoring + training)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.legend(loc="center left")
    ax.grid(alpha=0.3)


def fmt_bracket(b, spent: float) -> str:
    return f"never (>{spent:.2e})" if b is None else f"{b[0]:.2e}-{b[1]:.2e}"


def fmt_ratio(r) -> str:
    if r is None or r[0] is None or (not r[0] and r[1] is None):  # OPD itself; nothing bounded
        return ""
    return f"{r[0]:.2g}-{r[1]:.2g}x" if r[1] is not None else f">={r[0]:.2g}x"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    grid = report["grid"]
    table = Table(title=f"teacher {report['teacher_accuracy']:.3f}, target {report['target']:.3f} (90% of teacher); "
                        f"evaluated every {grid['eval_every']} steps and every {grid['eval_every_flops']:.2e} FLOPs")
    for col in ("method", "final accuracy [95% Wilson] (per seed)", "FLOPs to target, bracket (per seed)",
                "x OPD (means)", "FLOPs spent (per seed)"):
        table.add_column(col)
    for method, e in report["methods"].items():
        table.add_row(method,
                      " ".join(f"{a:.3f} [{lo:.3f},{hi:.3f}]" for a, (lo, hi) in zip(e["final_accuracy"],
                                                                                     e["final_interval"])),
                      " ".join(fmt_bracket(b, s) for b, s in zip(e["flops_to_target"], e["flops_spent"])),
                      fmt_ratio(e["ratio_to_opd"]), " ".join(f"{s:.2e}" for s in e["flops_spent"]))
    Console().print(table)
