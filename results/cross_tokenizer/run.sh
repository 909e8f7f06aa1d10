#!/usr/bin/env bash
# Cross-tokenizer OPD through the user path (docs/cross_tokenizer.md): a teacher and a student with
# different tokenizers (char / byte-level BPE) on reverse addition. Prints one JSON line per direction
# and writes them to $RESULT (default results/cross_tokenizer/result.json, the README's numbers).
#   results/cross_tokenizer/run.sh [OUT]
#   env: DIRECTIONS="char:bpe bpe:char" STEPS LR BATCH TEACHER_STEPS STUDENT_STOP STUDENT="layers hidden" RESULT
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT=${1:-runs/cross_tokenizer}
DIRECTIONS=${DIRECTIONS:-"char:bpe bpe:char"}  # teacher tokenizer : student tokenizer
STEPS=${STEPS:-2500}; LR=${LR:-1e-4}; BATCH=${BATCH:-64}; TEACHER_STEPS=${TEACHER_STEPS:-2000}
STUDENT_STOP=${STUDENT_STOP:-0.5}; STUDENT=${STUDENT:-"2 128"}  # student layers, hidden size (the teacher: 3, 128)
VOCAB=${VOCAB:-270}  # bpe: 256 bytes + 4 specials + ~10 merges (larger vocabularies made the task much harder)
RESULT=${RESULT:-$ROOT/results/cross_tokenizer/result.json}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} PATH="$ROOT/.venv/bin:$PATH"
read -r S_LAYERS S_HIDDEN <<<"$STUDENT"
mkdir -p "$OUT"; : > "$RESULT"
[ -f "$OUT/data/train.jsonl" ] || opd data --builtin reverse_addition --out "$OUT/data" >/dev/null
targs() { [ "$1" = bpe ] && echo "--tokenizer bpe --vocab-size $VOCAB" || echo "--tokenizer char"; }
for pair in $DIRECTIONS; do
  t=${pair%%:*}; s=${pair##*:}; d="$OUT/$t-teacher-$s-student"; mkdir -p "$d"
  start=$(date +%s)
  if [ ! -f "$OUT/teacher-$t/model.safetensors" ]; then  # one teacher per tokenizer, shared by the directions
    opd init-model --layers 3 --hidden 128 --heads 4 $(targs "$t") --tokenizer-data "$OUT/data/train.jsonl" \
      --out "$OUT/teacher-$t-init" >/dev/null
    opd sft --model "$OUT/teacher-$t-init" --data "$OUT/data/train.jsonl" --steps "$TEACHER_STEPS" --no-progress \
      --out "$OUT/teacher-$t" >/dev/null
  fi
  opd init-model --layers "$S_LAYERS" --hidden "$S_HIDDEN" --heads 4 --seed 1 $(targs "$s") \
    --tokenizer-data "$OUT/data/train.jsonl" --out "$d/student-init" >/dev/null
  opd sft --model "$d/student-init" --data "$OUT/data/train.jsonl" --steps 2000 --eval "$OUT/data/eval.jsonl" \
    --eval-every 25 --stop-at "$STUDENT_STOP" --no-progress --out "$d/student" >/dev/null
  cat > "$d/run.yaml" <<YAML
teacher: {model: $OUT/teacher-$t}
student: {model: $d/student}
task: {train: $OUT/data/train.jsonl, eval: $OUT/data/eval.jsonl, verifier: exact}
rollout: {batch_size: $BATCH, max_new_tokens: 8}
train: {steps: $STEPS, lr: $LR, eval_every: $((STEPS / 5)), checkpoint_every: 0}
out: $d/run
YAML
  opd distill "$d/run.yaml" --no-progress --json 2>"$d/distill.log" | tail -1 > "$d/summary.line"
  python - "$d" "$t" "$s" "$start" "$LR" "$BATCH" "$STUDENT" <<'PY' | tee -a "$RESULT"
import json, sys, time
d, t, s, start, lr, batch, student = sys.argv[1:]
summary = json.load(open(f"{d}/run/summary.json"))
metrics = [json.loads(line) for line in open(f"{d}/run/metrics.jsonl")]
evals = [json.loads(line) for line in open(f"{d}/run/eval.jsonl")]
last = metrics[-50:]
mean = lambda key: round(sum(m.get(key, 0) for m in last) / len(last), 4)
total = lambda key: sum(m.get(key, 0) for m in metrics)
print(json.dumps({"teacher_tokenizer": t, "student_tokenizer": s, **{k: summary.get(k) for k in (
    "teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "gap_closed", "steps")},
    "lr": float(lr), "batch_size": int(batch), "student_layers_hidden": student,
    "evals": [[e["step"], e["accuracy"]] for e in evals], "opd_wall_seconds": summary.get("wall_seconds"),
    "direction_seconds": round(time.time() - int(start)),  # + the student's SFT (and the teacher's, if built)
    "one_to_one_last50": mean("align/one_to_one"), "student_span_len_last50": mean("align/student_span_len"),
    "teacher_span_len_last50": mean("align/teacher_span_len"), "reverse_kl_last50": mean("reverse_kl"),
    "rows": sum(m["kept"] for m in metrics), "cut_rows": total("align/unaligned"),
    **{k[6:]: total(k) for k in metrics[-1] if k.startswith("align/penalised_") or k == "align/cut_char_at_end"}}))
PY
done
