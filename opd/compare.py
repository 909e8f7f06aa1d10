"""`opd compare`: every method from the same student start, on the same prompts, at equal compute.

OPD runs first; its FLOPs to 90% of the teacher's accuracy set the RL budget (`rl_budget` × that,
at least 10×, so "RL never reached it" means something). Curves are evaluated on a schedule of
cumulative FLOPs and written to compare.json / compare.png with a printed table.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from opd.config import DistillConfig
from opd.errors import OpdError
from opd.loop import distill
from opd.store.rundir import read_jsonl
from opd.train.step import METHODS


def curve_of(run_dir: Path) -> list[list[float]]:
    return [[e["flops"], e["accuracy"]] for e in read_jsonl(run_dir / "eval.jsonl")]


def flops_to(curve, target: float) -> float | None:
    """Cumulative FLOPs at the first evaluation at or above `target` (None if never)."""
    return next((f for f, acc in curve if acc >= target), None)


def with_overrides(cfg: DistillConfig, overrides: list[str]) -> DistillConfig:
    from opd.config import apply_override, from_dict, to_dict, validate

    data = to_dict(cfg)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(from_dict(DistillConfig, data))


def compare(base: DistillConfig, methods: list[str], seeds: int, out: str | Path, *, rl_budget: float = 10.0,
            evals_per_run: int = 20, method_overrides: dict | None = None, rl_stop_at_target: bool = True,
            progress: bool = True) -> dict:
    """`method_overrides`: per-method `--set`-style assignments, e.g. {"rl": ["train.lr=1e-4"]}."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OpdError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if seeds <= 0:
        raise OpdError("--seeds must be positive")
    out = Path(out)
    order = ["opd"] + [m for m in methods if m != "opd"]  # OPD first: it sets the RL budget
    results: dict = {m: {"final_accuracy": [], "flops_to_target": [], "curve": [], "runs": []} for m in order}
    teacher_acc = target = None
    eval_every_flops = rl_max_flops = None
    for method in order:
        for seed in range(seeds):
            cfg = with_overrides(copy.deepcopy(base), [f"method.name={method}", f"train.seed={seed}",
                                                        *(method_overrides or {}).get(method, [])])
            cfg.out = str(out / "runs" / f"{method}-seed{seed}")
            cfg.train.checkpoint_every = 0
            cfg.logging.report = False  # one report per run would only slow the comparison down
            if eval_every_flops:
                cfg.train.eval_every_flops = eval_every_flops
            if method == "rl":
                cfg.train.max_flops = rl_max_flops
                cfg.train.steps = 10**7  # bounded by max_flops
                cfg.train.eval_every = 10**7
                if rl_stop_at_target:  # RL's later accuracy is not needed for "FLOPs to target"; save the time
                    cfg.train.stop_at_accuracy = target
            summary = distill(cfg, progress=progress)
            curve = curve_of(Path(cfg.out))
            if teacher_acc is None:
                if summary["teacher_accuracy"] is None:
                    raise OpdError("opd compare needs a local teacher: its accuracy sets the target")
                teacher_acc = summary["teacher_accuracy"]
                target = 0.9 * teacher_acc
            entry = results[method]
            entry["final_accuracy"].append(summary["student_accuracy_after"])
            entry["flops_to_target"].append(flops_to(curve, target))
            entry["curve"].append(curve)
            entry["runs"].append(cfg.out)
        if method == "opd":  # the FLOPs schedule and the RL budget come from OPD
            spent = [c[-1][0] for c in results["opd"]["curve"]]
            reached = [f for f in results["opd"]["flops_to_target"] if f is not None]
            eval_every_flops = max(spent) / evals_per_run
            rl_max_flops = rl_budget * (max(reached) if reached else max(spent))
    if "opd" not in methods:
        results.pop("opd")
    report = {"teacher_accuracy": teacher_acc, "target": target, "seeds": seeds,
              "rl_stopped_at_target": rl_stop_at_target and "rl" in methods,
              "method_overrides": method_overrides or {},
              "rl_budget_flops": rl_max_flops if "rl" in methods else None, "methods": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "compare.png")
    return report


def plot(report: dict, path: Path) -> None:
    """Accuracy vs cumulative FLOPs (log): one line per method (mean over seeds), band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"teacher {report['teacher_accuracy']:.3f}, target {report['target']:.3f} (90% of teacher)")
    for col in ("method", "final accuracy (per seed)", "FLOPs to target (per seed)", "FLOPs spent (per seed)"):
        table.add_column(col)
    for method, e in report["methods"].items():
        fmt = lambda v: "never" if v is None else f"{v:.2e}"  # noqa: E731
        table.add_row(method, " ".join(f"{a:.3f}" for a in e["final_accuracy"]),
                      " ".join(fmt(f) for f in e["flops_to_target"]),
                      " ".join(f"{c[-1][0]:.2e}" for c in e["curve"]))
    Console().print(table)
