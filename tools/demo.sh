#!/usr/bin/env bash
# The main job on the embedded default: train the small detector recipe on the synthetic dataset
# (generated on first use) and evaluate it on the synthetic validation split.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/demo-student}
if [ -f "$OUT/eval.json" ]; then
  echo "$OUT is already trained; showing its evaluation (delete it to train again)"
  "$BIN/ldcache" evaluate --checkpoint "$OUT/checkpoints/last.pt" --out "$OUT/val_results.json"
else
  "$BIN/ldcache" train-detector --config configs/synthetic-student.toml --out "$OUT" --resume
fi
