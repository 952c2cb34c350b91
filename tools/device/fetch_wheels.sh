#!/usr/bin/env bash
# Wheels for a lent GPU machine (the `device` tool's H200: Python 3.12, a CUDA torch, numpy, typer,
# tqdm, matplotlib, scipy, opencv, pyyaml, rich, six; no network). It lacks ldcache's zarr stack,
# pycocotools and the mmdetection oracle of ../shared/tools/mmdet_oracle, so fetch them here, from
# the repository root, and carry the folder:
#     bash tools/device/fetch_wheels.sh              # -> .whl/ (ignored by git), about 16 MB
#     PYVER=3.11 bash tools/device/fetch_wheels.sh /tmp/whl311   # wheels for a rehearsal here
# Versions are the ones this project tests with (zarr, numcodecs, pycocotools) and the oracle's.
set -euo pipefail
PYVER="${PYVER:-3.12}"
DEST="${1:-.whl}"
STUB="${STUB:-../shared/tools/mmdet_oracle/mmcv_ext_stub.py}"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DEST" \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 pycocotools==2.0.11 \
  mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.1.0 addict==2.4.0 termcolor==3.3.0 terminaltables==3.1.10 \
  yapf==0.43.0 platformdirs==4.14.9 shapely==2.2.0
cp "$STUB" "$DEST/mmcv_ext_stub.py"  # mmcv-lite has no compiled ops; the oracle's pure-torch stand-in
du -sh "$DEST"
