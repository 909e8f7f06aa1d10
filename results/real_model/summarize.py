"""Collect results/real_model.json from a results/real_model.sh work folder: the comparison (opd compare's
compare.json), the retention probe measured on every run's final student, the stock model and the
teacher, and the wall time of each stage.

    python results/real_model/summarize.py WORK_DIR OUT_JSON [OUT_PNG]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from opd.backends.hf import load_model
from opd.compare import plot_curves
from opd.eval.evaluate import evaluate
from opd.tasks.data import load_jsonl
from opd.tasks.schema import PromptSchema
from opd.tasks.verifiers import make_verifier

RETENTION_VERIFIER = "python:results.real_model.verify:names_city"
NEW_TOKENS = 16  # as the addition evaluations


def accuracy_on(model_dir: str, rows: list[dict], verifier_spec: str) -> dict:
    """Greedy accuracy of a saved model on `rows` with the chat schema, as `opd eval` measures it."""
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    result = evaluate(loaded.model, loaded.tokenizer, rows, PromptSchema.from_spec("chat"),
                      make_verifier(verifier_spec), max_new_tokens=NEW_TOKENS, batch_size=256, progress=False)
    return {"accuracy": result.accuracy, "interval": list(result.interval95()), "n": result.n}


def main(work: Path, out: Path, figure: Path | None = None) -> None:
    compare = json.loads((work / "out" / "compare.json").read_text())
    timings = json.loads((work / "timings.json").read_text())
    retention_rows = load_jsonl(str(work / "data" / "retention.jsonl"))
    stock = (work / "stock_model").read_text().strip()
    first_run = Path(compare["methods"]["opd"]["runs"][0])
    start = json.loads((first_run / "summary.json").read_text())
    teacher_sft = json.loads((work / "teacher" / "sft_summary.json").read_text())
    started = time.time()

    retention = {"stock": accuracy_on(stock, retention_rows, RETENTION_VERIFIER),
                 "teacher": accuracy_on(str(work / "teacher"), retention_rows, RETENTION_VERIFIER)}
    methods = {}
    for name, entry in compare["methods"].items():
        per_seed = []
        for seed, run in enumerate(entry["runs"]):
            after = accuracy_on(str(Path(run) / "student"), retention_rows, RETENTION_VERIFIER)
            summary = json.loads((Path(run) / "summary.json").read_text())
            per_seed.append({
                "seed": seed,
                "final_accuracy": entry["final_accuracy"][seed],
                "final_interval95": entry["final_interval"][seed],
                "flops_to_90pct_teacher": entry["flops_to_target"][seed],  # [lo, hi] bracket, None = never
                "flops_spent": entry["flops_spent"][seed],
                "steps": summary.get("steps"),
                "wall_seconds": summary.get("wall_seconds"),
                "retention_before": retention["stock"]["accuracy"],
                "retention_after": after["accuracy"],
                "retention_after_interval95": after["interval"],
                "curve": entry["curve"][seed],  # [cumulative FLOPs, held-out accuracy]
            })
        methods[name] = {"seeds": per_seed, "flops_ratio_to_opd": entry["ratio_to_opd"]}
    report = {
        "task": "two-digit addition, 'What is A plus B? Reply with only the number.', chat schema, numeric "
                "verifier, greedy, 16 new tokens",
        "eval_n": start["eval_n"],
        "teacher_accuracy": compare["teacher_accuracy"],
        "teacher_sft": teacher_sft,
        "stock_student_accuracy": start["student_accuracy_before"],
        "target": compare["target"],
        "retention_probe": {"task": "capital cities, 'What is the capital of X? Reply with only the city name.'",
                            "verifier": RETENTION_VERIFIER, "stock": retention["stock"], "teacher": retention["teacher"]},
        "grid": compare["grid"],
        "rl_budget_flops": compare["rl_budget_flops"],
        "rl_stopped_at_target": compare["rl_stopped_at_target"],
        "method_overrides": compare["method_overrides"],
        "methods": methods,
        "wall_seconds": {**timings, "retention_and_summary": round(time.time() - started)},
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    if figure:
        plot(compare, report, figure)
    print(markdown(report))


def markdown(report: dict) -> str:
    """The README's table: one row per method, per-seed figures separated by slashes."""
    def per_seed(seeds, fmt):
        return " / ".join(fmt(s) for s in seeds)

    def accuracy(s):
        lo, hi = s["final_interval95"]
        return f"{s['final_accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"

    def bracket(s):
        b = s["flops_to_90pct_teacher"]
        return "never" if b is None else f"{b[0]:.2g}–{b[1]:.2g}"

    def retention(s):
        return f"{s['retention_after']:.3f}"

    def wall(s):
        return f"{s['wall_seconds']:.0f}"

    def versus(ratio):
        if not ratio or ratio[0] is None or (not ratio[0] and ratio[1] is None):  # nothing bounded
            return "—"
        return f"{ratio[0]:.2g}–{ratio[1]:.2g}×" if ratio[1] is not None else f"≥{ratio[0]:.2g}×"

    probe = report["retention_probe"]
    lines = [f"| method (teacher {report['teacher_accuracy']:.3f}, target {report['target']:.3f}, stock student "
             f"{report['stock_student_accuracy']:.3f}) | final accuracy [95% interval], per seed | FLOPs to target "
             f"(bracket), per seed | vs OPD | capitals after (stock {probe['stock']['accuracy']:.3f}) | wall s |",
             "|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        seeds = m["seeds"]
        lines.append(f"| {name} | {per_seed(seeds, accuracy)} | {per_seed(seeds, bracket)} | "
                     f"{versus(m['flops_ratio_to_opd'])} | {per_seed(seeds, retention)} | {per_seed(seeds, wall)} |")
    lines.append(f"| teacher (full SFT) | {report['teacher_accuracy']:.3f} | | | {probe['teacher']['accuracy']:.3f} | |")
    return "\n".join(lines)


def plot(compare: dict, report: dict, path: Path) -> None:
    """Left: held-out accuracy vs FLOPs (opd compare's curves). Right: retention before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    plot_curves(compare, curves)
    curves.set_title(f"two-digit addition ({report['eval_n']} held-out prompts)")
    names = ["stock", "teacher", *report["methods"]]
    values = [[report["retention_probe"]["stock"]["accuracy"]], [report["retention_probe"]["teacher"]["accuracy"]],
              *([s["retention_after"] for s in m["seeds"]] for m in report["methods"].values())]
    for i, seeds in enumerate(values):
        bars.bar(i, sum(seeds) / len(seeds), color="lightgray" if i < 2 else f"C{i - 2}")
        bars.scatter([i] * len(seeds), seeds, c="black", s=12, zorder=3)
    bars.axhline(values[0][0], ls="--", c="gray", lw=1)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylabel("capital-city accuracy (seeds as dots)")
    bars.set_title("retention: an unrelated skill after training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
