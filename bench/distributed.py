"""What data parallelism costs on CPU: `opd distill` per-step time on 1 process and on 2 gloo ranks.

    python bench/distributed.py [--steps 12] [--out results/distributed.json]

Models come from configs (the demo's sizes: teacher 3 layers x 128, student 2 x 64, plus a wider
student 4 x 256) and the demo's built-in task, untrained: this measures time, not learning. Each
configuration runs `opd distill` as a fresh process:
    1proc-1thread   one process, OMP_NUM_THREADS=1
    1proc-2threads  one process, OMP_NUM_THREADS=2 (the whole 2-core machine)
    2ranks          `--nproc 2`, one thread per rank (each rank samples, scores and trains half the rows)
The per-step time is the median over steps 3.. of time_sample_s + time_score_s + time_update_s as
rank 0 logs it (a rank waits for the other in every collective, so it is the job's step time).
Overhead of 2 ranks = 2ranks − 1proc-1thread / 2 (perfect scaling halves the one-thread time).
It also times the gradient all-reduce alone (World.sync_grads) for each student's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OPD = str(Path(sys.executable).parent / "opd")
STUDENTS = {"2x64": (2, 64), "4x256": (4, 256)}


def build(root: Path) -> dict:
    from opd.backends.hf import init_model
    from opd.tasks.builtin import builtin_split

    train, _ = builtin_split("reverse_addition", 200, 20, 1234, digits=3)
    texts = [ex.prompt + ex.answer for ex in train]
    dirs = {"teacher": init_model("qwen3", 3, 128, 4, texts, root / "teacher", seed=0)}
    for name, (layers, hidden) in STUDENTS.items():
        dirs[name] = init_model("qwen3", layers, hidden, 4, texts, root / f"student-{name}", seed=1)
    return dirs


def config(root: Path, dirs: dict, student: str, out: Path, steps: int) -> Path:
    cfg = {"teacher": {"model": str(dirs["teacher"])}, "student": {"model": str(dirs[student])},
           "task": {"builtin": "reverse_addition", "params": {"digits": 3}, "n_train": 2000, "n_eval": 16},
           "rollout": {"batch_size": 64, "max_new_tokens": 8},
           "train": {"steps": steps, "eval_every": steps, "checkpoint_every": 0, "lr": 1e-3},
           "logging": {"report": False}, "out": str(out)}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def step_time(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][2:]
    return statistics.median(r["time_sample_s"] + r["time_score_s"] + r["time_update_s"] for r in rows)


def distill(cfg: Path, threads: int, nproc: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = [OPD, "distill", str(cfg), "--no-progress", "--no-preflight"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    t0 = time.time()
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=1800)
    return time.time() - t0


def allreduce_seconds(params: int, repeats: int = 5) -> float:
    """Median seconds of World.sync_grads over `params` float32 gradients on 2 local gloo ranks."""
    code = f"""
import os, statistics, time, torch
from opd.world import World
w = World.from_env()
p = torch.nn.Parameter(torch.zeros({params}))
times = []
for _ in range({repeats}):
    p.grad = torch.ones_like(p)
    w.barrier(); t0 = time.perf_counter(); w.sync_grads([p]); times.append(time.perf_counter() - t0)
if w.main: print(statistics.median(times))
w.close()
"""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f.name],
                         env=env, check=True, capture_output=True, text=True, timeout=600)
    os.unlink(f.name)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "results" / "distributed.json"))
    args = parser.parse_args()
    from opd.backends.hf import load_model

    results = {"steps": args.steps, "batch_rows": 64, "max_new_tokens": 8, "cpu_count": os.cpu_count(),
               "students": {}}
    with tempfile.TemporaryDirectory(prefix="opd-bench-dp-") as tmp:
        root = Path(tmp)
        dirs = build(root)
        for student in STUDENTS:
            params = sum(p.numel() for p in load_model(str(dirs[student])).model.parameters())
            entry = {"params": params}
            for name, threads, nproc in (("1proc-1thread", 1, 1), ("1proc-2threads", 2, 1), ("2ranks", 1, 2)):
                out = root / f"{student}-{name}"
                wall = distill(config(root, dirs, student, out, args.steps), threads, nproc)
                entry[name] = {"step_s": round(step_time(out), 4), "wall_s": round(wall, 1)}
                print(f"{student} {name}: {entry[name]['step_s']:.3f} s/step (wall {wall:.0f} s)", flush=True)
            one = entry["1proc-1thread"]["step_s"]
            entry["2rank_overhead_s"] = round(entry["2ranks"]["step_s"] - one / 2, 4)
            entry["2rank_speedup_vs_1thread"] = round(one / entry["2ranks"]["step_s"], 2)
            entry["2rank_speedup_vs_2threads"] = round(entry["1proc-2threads"]["step_s"] / entry["2ranks"]["step_s"], 2)
            entry["grad_allreduce_s"] = round(allreduce_seconds(params), 5)
            results["students"][student] = entry
    results["grad_allreduce_135M_s"] = round(allreduce_seconds(134_515_008, repeats=3), 3)  # SmolLM2-135M's size
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
