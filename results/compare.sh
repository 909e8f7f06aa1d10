#!/usr/bin/env bash
# Reproduces results/compare.json and results/compare.png: OPD vs SFT on teacher traces vs RL,
# on the built-in running_sum task (10 digits -> 10 running sums mod 10; an early error makes
# every later digit wrong), 3 seeds, from one student start. Run from the repo root after `make install`.
set -euo pipefail
OPD=${OPD:-.venv/bin/opd}
K=${K:-10}                      # digits per prompt (answer length)
W=${W:-runs/compare-k$K}
NAME=${NAME:-compare}           # results/$NAME.json and results/$NAME.png
mkdir -p "$W"
$OPD data --builtin running_sum --param length=$K --n-train 20000 --n-eval 500 --out "$W/data"
# An imperfect teacher (its SFT is stopped early, around 0.8) and a weak student that knows the format.
$OPD init-model --arch qwen3 --layers 4 --hidden 128 --heads 4 --intermediate 256 --seed 0 \
    --tokenizer-data "$W/data/train.jsonl" --out "$W/teacher-init"
$OPD init-model --arch qwen3 --layers 2 --hidden 64 --heads 4 --intermediate 128 --seed 0 \
    --tokenizer-data "$W/data/train.jsonl" --out "$W/student-init"
$OPD sft --model "$W/teacher-init" --data "$W/data/train.jsonl" --steps 2000 --warmup 100 --out "$W/teacher" \
    --eval "$W/data/eval.jsonl" --eval-every 5 --stop-at 0.78 --max-new-tokens $((K + 2)) --no-progress
$OPD sft --model "$W/student-init" --data "$W/data/train.jsonl" --steps 2000 --warmup 100 --out "$W/student" \
    --eval "$W/data/eval.jsonl" --eval-every 5 --stop-at 0.30 --max-new-tokens $((K + 2)) --no-progress
cat > "$W/compare.yaml" <<YAML
teacher: {model: $W/teacher}
student: {model: $W/student}
task: {train: $W/data/train.jsonl, eval: $W/data/eval.jsonl, verifier: exact}
rollout: {batch_size: 64, max_new_tokens: $((K + 2))}
train: {steps: 300, lr: 1.0e-3, warmup_steps: 100, eval_every: 5}
out: $W/unused
YAML
# Every method (RL too) is evaluated every 15 steps and each time its FLOPs cross a multiple of one
# shared spacing (OPD's projected FLOPs / 20, from a 5-step OPD pilot), so FLOPs-to-target brackets compare.
# RL: REINFORCE with a group baseline, 8 samples for each of 8 prompts, lr 1e-4 (1e-3 collapses).
$OPD compare "$W/compare.yaml" --methods opd,sft,rl --seeds 3 --out "$W/out" --no-progress --evals-per-run 60 \
    --method-set rl:train.lr=1.0e-4 --method-set rl:rollout.batch_size=8 --method-set rl:rollout.samples_per_prompt=8
cp "$W/out/compare.json" "results/$NAME.json"
cp "$W/out/compare.png" "results/$NAME.png"
