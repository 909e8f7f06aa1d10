#!/usr/bin/env bash
# OPD on the built-in calculator tool task (multi-turn episodes), from nothing but this repository:
# data, a teacher by SFT on the teacher's transcripts, a weak student by SFT on transcripts with
# redundant calls and in-head guesses (results/multi_turn/student_traces.py), then opd distill.
#     bash results/multi_turn/run.sh [OUT]          (OUT defaults to runs/multi-turn)
# A stage whose output exists is not redone (delete OUT/opd to rerun only the distillation).
set -euo pipefail
OUT=${1:-runs/multi-turn}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
[ -d "$OUT/data" ] || opd data --builtin calculator --out "$OUT/data"
[ -f "$OUT/data/student_messages.jsonl" ] || python "$HERE/student_traces.py" "$OUT/data"
[ -d "$OUT/teacher-init" ] || opd init-model --arch qwen3 --layers 3 --hidden 128 --heads 4 \
    --tokenizer-data "$OUT/data/chars.txt" --out "$OUT/teacher-init" --seed 0
[ -d "$OUT/student-init" ] || opd init-model --arch qwen3 --layers 2 --hidden 64 --heads 4 \
    --tokenizer-data "$OUT/data/chars.txt" --out "$OUT/student-init" --seed 1
[ -d "$OUT/teacher" ] || opd sft --model "$OUT/teacher-init" --data "$OUT/data/train_messages.jsonl" \
    --steps ${TEACHER_STEPS:-600} --lr 1e-3 --out "$OUT/teacher" --no-progress
[ -d "$OUT/student" ] || opd sft --model "$OUT/student-init" --data "$OUT/data/student_messages.jsonl" \
    --steps ${STUDENT_STEPS:-600} --lr 1e-3 --out "$OUT/student" --no-progress
cat > "$OUT/distill.yaml" <<YAML
teacher: {model: $OUT/teacher}
student: {model: $OUT/student}
task: {train: $OUT/data/train.jsonl, eval: $OUT/data/eval.jsonl, env: "python:opd.tasks.calculator:CalculatorEnv",
       verifier: exact}
rollout: {batch_size: 32, max_new_tokens: 20, max_turns: 4}
train: {steps: ${OPD_STEPS:-400}, lr: 1e-3, eval_every: 100, checkpoint_every: 0}
eval: {limit: 200}
out: $OUT/opd
YAML
opd distill "$OUT/distill.yaml" --no-progress
python - "$OUT" "$HERE/result.json" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1]) / "opd"
evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
summary = json.loads((run / "summary.json").read_text())
keys = ("step", "accuracy", "n", "episode/turns", "episode/tool_calls", "episode/redundant_calls", "episode/malformed_calls")
out = {"teacher_accuracy": summary["teacher_accuracy"], "student_before": summary["student_accuracy_before"],
       "student_after": summary["student_accuracy_after"], "gap_closed": summary["gap_closed"],
       "distill_wall_seconds": summary["wall_seconds"], "steps": summary["steps"], "flops": summary["flops"],
       "evals": [{k: e.get(k) for k in keys} for e in evals]}
Path(sys.argv[2]).write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
PY
