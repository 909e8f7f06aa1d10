#!/usr/bin/env bash
# Cross-tokenizer OPD through the user path (docs/cross_tokenizer.md): a teacher and a student with
# different tokenizers (char / byte-level BPE) on reverse addition; prints one JSON line per direction.
#   results/cross_tokenizer/run.sh [OUT]        env: DIRECTIONS="char:bpe bpe:char" STEPS LR TEACHER_STEPS
set -euo pipefail
OUT=${1:-runs/cross_tokenizer}
DIRECTIONS=${DIRECTIONS:-"char:bpe bpe:char"}  # teacher tokenizer : student tokenizer
STEPS=${STEPS:-1500}; LR=${LR:-1e-4}; TEACHER_STEPS=${TEACHER_STEPS:-2000}; STUDENT_STOP=${STUDENT_STOP:-0.5}
VOCAB=${VOCAB:-270}  # bpe: 256 bytes + 4 specials + ~10 merges (larger vocabularies made the task much harder)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PATH="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH"
mkdir -p "$OUT"
[ -f "$OUT/data/train.jsonl" ] || opd data --builtin reverse_addition --out "$OUT/data" >/dev/null
for pair in $DIRECTIONS; do
  t=${pair%%:*}; s=${pair##*:}; d="$OUT/$t-teacher-$s-student"; mkdir -p "$d"
  targs() { [ "$1" = bpe ] && echo "--tokenizer bpe --vocab-size $VOCAB" || echo "--tokenizer char"; }
  start=$(date +%s)
  if [ ! -f "$OUT/teacher-$t/model.safetensors" ]; then  # one teacher per tokenizer, shared by the directions
    opd init-model --layers 3 --hidden 128 --heads 4 $(targs "$t") --tokenizer-data "$OUT/data/train.jsonl" \
      --out "$OUT/teacher-$t-init" >/dev/null
    opd sft --model "$OUT/teacher-$t-init" --data "$OUT/data/train.jsonl" --steps "$TEACHER_STEPS" --no-progress \
      --out "$OUT/teacher-$t" >/dev/null
  fi
  opd init-model --layers 2 --hidden 64 --heads 4 --seed 1 $(targs "$s") --tokenizer-data "$OUT/data/train.jsonl" \
    --out "$d/student-init" >/dev/null
  opd sft --model "$d/student-init" --data "$OUT/data/train.jsonl" --steps 2000 --eval "$OUT/data/eval.jsonl" \
    --eval-every 25 --stop-at "$STUDENT_STOP" --no-progress --out "$d/student" >/dev/null
  cat > "$d/run.yaml" <<YAML
teacher: {model: $OUT/teacher-$t}
student: {model: $d/student}
task: {train: $OUT/data/train.jsonl, eval: $OUT/data/eval.jsonl, verifier: exact}
rollout: {batch_size: 64, max_new_tokens: 8}
train: {steps: $STEPS, lr: $LR, eval_every: $((STEPS / 5)), checkpoint_every: 0}
filters: [{rule: max_tokens, n: 5, name: answer_too_long}]
out: $d/run
YAML
  opd distill "$d/run.yaml" --no-progress --json 2>"$d/distill.log" | tail -1 > "$d/summary.line"
  python - "$d" "$t" "$s" "$start" <<'PY'
import json, sys, time
d, t, s, start = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
summary = json.load(open(f"{d}/run/summary.json"))
metrics = [json.loads(line) for line in open(f"{d}/run/metrics.jsonl")]
last = metrics[-50:]
print(json.dumps({"teacher_tokenizer": t, "student_tokenizer": s, **{k: summary.get(k) for k in (
    "teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "gap_closed", "steps", "wall_seconds")},
    "one_to_one_last50": sum(m.get("align/one_to_one", 0) for m in last) / len(last),
    "student_span_len_last50": sum(m.get("align/student_span_len", 0) for m in last) / len(last),
    "teacher_span_len_last50": sum(m.get("align/teacher_span_len", 0) for m in last) / len(last),
    "unaligned_total": sum(m.get("align/unaligned", 0) for m in metrics),
    "direction_seconds": round(time.time() - start)}))
PY
done
