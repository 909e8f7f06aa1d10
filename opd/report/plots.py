"""The report's curves over training steps, as base64 PNGs (matplotlib's Agg canvas, no pyplot).

Figures are built on `matplotlib.figure.Figure` directly, so making a report never switches the
caller's matplotlib backend or touches pyplot's global figure list.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from opd.report.checklist import RunFiles, wilson


@dataclass
class Plot:
    title: str
    png_base64: str
    note: str = ""  # what the curve means, shown under it


def render(title: str, ylabel: str, series: dict[str, tuple[list, list]], hlines: dict[str, float] | None = None,
           errors: dict[str, tuple[list, list]] | None = None) -> str:
    """Line plot(s) over steps as a base64 PNG; `errors` gives (lower, upper) bands for a series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.4, 3.2), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
        if errors and label in errors:
            lo, hi = errors[label]
            ax.fill_between(xs, lo, hi, alpha=0.2)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{len(series) + i}", label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) + len(hlines or {}) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _metric(metrics: list[dict], key: str) -> tuple[list, list]:
    pairs = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def accuracy_plot(run: RunFiles) -> Plot | None:
    evals = [e for e in run.evals if e.get("accuracy") is not None]
    if not evals:
        return None
    xs, ys = [e["step"] for e in evals], [e["accuracy"] for e in evals]
    bands = [wilson(e["accuracy"], e.get("n") or 0) for e in evals]
    hlines = {}
    if evals[0].get("teacher_accuracy") is not None:
        hlines["teacher"] = evals[0]["teacher_accuracy"]
    hlines["student before"] = evals[0]["accuracy"]
    png = render("held-out accuracy (greedy)", "accuracy", {"student": (xs, ys)}, hlines,
                 {"student": ([b[0] for b in bands], [b[1] for b in bands])})
    return Plot("Eval accuracy", png, "shaded: 95% Wilson interval over the eval set; dashed: teacher and baseline")


def metric_plot(run: RunFiles, key: str, title: str, ylabel: str, note: str = "") -> Plot | None:
    xs, ys = _metric(run.metrics, key)
    return Plot(title, render(title, ylabel, {key: (xs, ys)}), note) if xs else None


def reject_plot(run: RunFiles) -> Plot | None:
    rules = sorted({k for m in run.metrics for k in m if k.startswith("reject/")})
    series = {r[7:]: _metric(run.metrics, r) for r in rules}
    if "kept" in {k for m in run.metrics for k in m}:
        series["kept"] = _metric(run.metrics, "kept")
    if not any(xs for xs, _ in series.values()):
        return None
    return Plot("Rollouts rejected by rule", render("rollouts per step: rejected by rule / kept", "rollouts", series),
                "the first rule that rejects a rollout is counted")


def lag_plot(run: RunFiles) -> Plot | None:
    """Policy lag per step (step - 1 - policy_version) from the sample store (else metrics' policy_lag)."""
    store = run.store()
    rows = []
    if store is not None and store.parts("rollouts"):
        rows = store.rows("select step, max(step - 1 - policy_version) as max_lag, "
                          "avg(step - 1 - policy_version) as mean_lag from rollouts group by step order by step")
    if not rows:
        xs, ys = _metric(run.metrics, "policy_lag")
        rows = [{"step": x, "max_lag": y, "mean_lag": y} for x, y in zip(xs, ys)]
    if not rows:
        return None
    xs = [r["step"] for r in rows]
    series = {"max lag": (xs, [r["max_lag"] for r in rows]), "mean lag": (xs, [r["mean_lag"] for r in rows])}
    return Plot("Rollout staleness", render("policy lag of rollouts (optimizer steps)", "lag", series),
                "lag = step - 1 - policy version that sampled the rollout; 0 = on-policy")


def all_plots(run: RunFiles) -> list[Plot]:
    """Every curve the run has data for, in reading order."""
    plots = [
        accuracy_plot(run),
        metric_plot(run, "reverse_kl", "Reverse KL to the teacher", "nats / token",
                    "per sampled token, KL(student || teacher) on the student's own rollouts"),
        metric_plot(run, "loss", "Training loss", "loss"),
        metric_plot(run, "completion_len", "Completion length", "tokens", "mean sampled tokens per rollout"),
        metric_plot(run, "tokens_per_s", "Throughput", "tokens / s", "completion tokens per second of a step"),
        reject_plot(run),
        lag_plot(run),
    ]
    return [p for p in plots if p is not None]
