#!/usr/bin/env bash
# The whole d1 pipeline on the tiny default, on a laptop CPU (the README gives its time):
#   data (generated 4x4 Sudoku) -> sft.py -> grpo.py -> the baseline: SFT continued for GRPO's wall time
#   -> evaluate.py on the held-out puzzles -> the table "sft | sft-continued | grpo" and a plot.
# SFT sees demonstrations from only 16 of the 240 training grids; GRPO sees prompts from all 240 and
# learns from the reward alone; the test puzzles come from 48 grids neither stage saw.
#   SEED=1 OUT=out/seed1 bash run_tiny.sh
set -euo pipefail
SEED=${SEED:-0}
OUT=${OUT:-out}

python sft.py --seed "$SEED" --out-dir "$OUT/sft"
start=$(date +%s)
python grpo.py --seed "$SEED" --model "$OUT/sft" --out-dir "$OUT/grpo"
grpo_seconds=$(( $(date +%s) - start ))
# the honest baseline: the same SFT checkpoint trained further, on the demonstrations it has, for as long
# (its cosine schedule runs over that time budget, as GRPO's runs over its steps)
python sft.py --seed "$SEED" --model "$OUT/sft" --out-dir "$OUT/sft-continued" --lr 5e-4 --warmup-steps 0 \
    --max-steps 100000 --max-seconds "$grpo_seconds" --eval-every 0
python evaluate.py --model "$OUT/sft" "$OUT/sft-continued" "$OUT/grpo" --output-dir "$OUT/eval"
