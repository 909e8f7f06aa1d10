"""The report's curves over training steps, as base64 PNGs (matplotlib's Agg canvas, no pyplot).

Figures are built on `matplotlib.figure.Figure` directly, so making a report never switches the
caller's matplotlib backend or touches pyplot's global figure list.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

from opd.report.checklist import RunFiles, wilson


@dataclass
class Plot:
    title: str
    png_base64: str
    note: str = ""  # what the curve means, shown under it


def render(title: str, ylabel: str, series: dict[str, tuple[list, list]], hlines: dict[str, float] | None = None,
           errors: dict[str, tuple[list, list]] | None = None) -> str:
    """Line plot(s) over steps as a base64 PNG; `errors` gives (lower, upper) bands for a series."""
    return render_panels(title, [Panel(ylabel, series, hlines or {}, errors or {})])


@dataclass
class Panel:
    """One axis of a figure: its series share the y scale."""

    ylabel: str
    series: dict[str, tuple[list, list]]
    hlines: dict[str, float] = field(default_factory=dict)
    errors: dict[str, tuple[list, list]] = field(default_factory=dict)


def render_panels(title: str, panels: list[Panel]) -> str:
    """Panels stacked over one shared step axis (so counts of very different size each get their own scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.4, 3.2 + 1.6 * (len(panels) - 1)), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colour = 0
    for ax, panel in zip(axes, panels):
        for label, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label, color=f"C{colour}")
            if label in panel.errors:
                lo, hi = panel.errors[label]
                ax.fill_between(xs, lo, hi, alpha=0.2, color=f"C{colour}")
            colour += 1
        for label, y in panel.hlines.items():
            ax.axhline(y, linestyle="--", linewidth=1, color=f"C{colour}", label=label)
            colour += 1
        if panel.hlines:  # axhline does not widen the y range: a teacher line above the curve would be cut off
            lo, hi = ax.get_ylim()
            lo, hi = min(lo, *panel.hlines.values()), max(hi, *panel.hlines.values())
            pad = 0.04 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) + len(panel.hlines) > 1 or len(panels) > 1:
            ax.legend(fontsize=7)
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
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
    """Kept rollouts on top, rejections by rule below: on one axis a few rejects vanish under the kept line."""
    rules = sorted({k for m in run.metrics for k in m if k.startswith("reject/")})
    rejected = {r[7:]: _metric(run.metrics, r) for r in rules}
    if not any(any(ys) for _, ys in rejected.values()):
        return None
    panels = [Panel("rejected", rejected)]
    kept = _metric(run.metrics, "kept")
    if kept[0]:
        panels.insert(0, Panel("kept", {"kept": kept}))
    return Plot("Rollouts rejected by rule", render_panels("rollouts per step: kept, and rejected by rule", panels),
                "the first rule that rejects a rollout is counted; rejected rollouts never enter the loss")


def _lag_rows(run: RunFiles) -> list[dict]:
    """Policy lag per step (step - 1 - policy_version) from the sample store, else metrics' policy_lag."""
    store = run.store()
    if store is not None and store.parts("rollouts"):
        rows = store.rows("select step, max(step - 1 - policy_version) as max_lag, "
                          "avg(step - 1 - policy_version) as mean_lag from rollouts group by step order by step")
        if rows:
            return rows
    xs, ys = _metric(run.metrics, "policy_lag")
    return [{"step": x, "max_lag": y, "mean_lag": y} for x, y in zip(xs, ys)]


def lag_plot(rows: list[dict]) -> Plot:
    xs = [r["step"] for r in rows]
    series = {"max lag": (xs, [r["max_lag"] for r in rows]), "mean lag": (xs, [r["mean_lag"] for r in rows])}
    return Plot("Rollout staleness", render("policy lag of rollouts (optimizer steps)", "lag", series),
                "lag = step - 1 - policy version that sampled the rollout; 0 = on-policy")


def _same(a: tuple[list, list], b: tuple[list, list]) -> bool:
    return a[0] == b[0] and all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(a[1], b[1]))


def curves(run: RunFiles) -> tuple[list[Plot], list[str]]:
    """The curves worth drawing for this run, in reading order, and a line for each one left out and why."""
    plots, omitted = [accuracy_plot(run)], []
    kl_note = "per sampled token, KL(student || teacher) on the student's own rollouts"
    if _metric(run.metrics, "loss")[0] and _same(_metric(run.metrics, "loss"), _metric(run.metrics, "reverse_kl")):
        omitted.append("training loss: identical to the reverse KL (the objective is the exact reverse KL)")
        kl_note += "; also the training loss"
        plots.append(metric_plot(run, "reverse_kl", "Reverse KL to the teacher (= training loss)", "nats / token",
                                 kl_note))
    else:
        plots += [metric_plot(run, "reverse_kl", "Reverse KL to the teacher", "nats / token", kl_note),
                  metric_plot(run, "loss", "Training loss", "loss")]
    plots += [metric_plot(run, "completion_len", "Completion length", "tokens", "mean sampled tokens per rollout"),
              metric_plot(run, "tokens_per_s", "Throughput", "tokens / s", "completion tokens per second of a step")]
    if any(k.startswith("reject/") for m in run.metrics for k in m):
        plot = reject_plot(run)
        plots.append(plot)
        if plot is None:
            omitted.append("rejects by rule: no rollout was rejected")
    lags = _lag_rows(run)
    if lags and any(r["max_lag"] for r in lags):
        plots.append(lag_plot(lags))
    elif lags:
        omitted.append("policy lag: 0 at every step (strictly on-policy)")
    return [p for p in plots if p is not None], omitted


def all_plots(run: RunFiles) -> list[Plot]:
    """Every curve worth drawing for the run, in reading order."""
    return curves(run)[0]
