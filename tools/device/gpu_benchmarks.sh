#!/usr/bin/env bash
# The GPU benchmarks as one prepared command for a lent device machine, run from the repository
# root there with the wheels of tools/device/fetch_wheels.sh carried:
#     run(command="bash tools/device/gpu_benchmarks.sh", carry=[".whl"], timeout_s=600)
# It installs the wheels into /tmp/site, checks the GPU and the imports, then runs
# `python -m benchmarks.run_all --gpu` script by script, most wanted first (vs_mmdetection, step_phases,
# train_throughput, dump_throughput, coco_geometry), starting none after BUDGET_S seconds from its
# own start and stopping a running one at the budget, and leaves in $OUT: env.txt, log.txt (every table and
# progress line) and results.tgz (each script's JSON and section, and SUMMARY-gpu.md; untar it into
# benchmarks/results/ to keep them).
# A rehearsal on a CPU machine (no GPU needed): a venv standing in for the device's python3, the
# wheels for its Python, and RUN_ALL_FLAGS="" for run_all's CPU plan (results go to RESULTS_DIR,
# never into the checkout), e.g.
#     PY=/tmp/devsim/bin/python WHEELS=/tmp/whl311 OUT=/tmp/devsim-out RUN_ALL_FLAGS="" \
#         SCRIPTS="sparse_size_coco_like vs_mmdetection" BUDGET_S=200 bash tools/device/gpu_benchmarks.sh
set -uo pipefail
start=$SECONDS  # the budget counts from here: installing and checking are part of it
OUT="${OUT:-/tmp/gpu-out}"
WHEELS="${WHEELS:-.whl}"
BUDGET_S="${BUDGET_S:-480}"
SCRIPTS="${SCRIPTS:-vs_mmdetection step_phases train_throughput dump_throughput coco_geometry}"
RESULTS_DIR="${RESULTS_DIR:-/tmp/gpu-results}"
PY="${PY:-python3}"
mkdir -p "$OUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$WHEELS"/*.whl || { echo "error: the wheels in $WHEELS did not install" | tee "$OUT/log.txt"; exit 1; }
cp "$WHEELS/mmcv_ext_stub.py" /tmp/site/mmcv/_ext.py
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import mmdet, numcodecs, pycocotools, torch, zarr
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, {gpu}; zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, "
      f"mmdet {mmdet.__version__}")
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: the imports failed (see env.txt)" | tee -a "$OUT/log.txt"; exit 1; }
for name in $SCRIPTS; do
  left=$(( BUDGET_S - (SECONDS - start) ))
  if (( left < 30 )); then
    echo "== $name: not started, ${BUDGET_S} s budget spent" | tee -a "$OUT/log.txt"
    continue
  fi
  # timeout signals the whole process group (run_all and the benchmark it runs), then kills it
  timeout -k 15 "$left" "$PY" -m benchmarks.run_all ${RUN_ALL_FLAGS---gpu} --only "$name" \
    --mmdet-python "$(command -v "$PY")" --results-dir "$RESULTS_DIR" 2>&1 | tee -a "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(( SECONDS - start )) s" | tee -a "$OUT/log.txt"
  # packed after every script (at most 8 files come back from $OUT): a run stopped later keeps these
  if compgen -G "$RESULTS_DIR/*.json" >/dev/null; then
    tar czf "$OUT/results.tgz.tmp" -C "$RESULTS_DIR" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  fi
done
[ -f "$OUT/results.tgz" ] || echo "no results written" | tee -a "$OUT/log.txt"
