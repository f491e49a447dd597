#!/usr/bin/env bash
# One prepared GPU check (see ../shared/device/README.md): GPU-marked tests, then the benchmarks, results under $OUT.
# On the device machine:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#                         export PYTHONPATH=$PWD:/tmp/site && bash benchmarks/gpu_check.sh
# Sizes come from the environment, so the same script runs as a quick CPU check of itself:
#   OUT=/tmp/gc N=6 PX="48 64" SIZE=32 BATCH=8 STEPS=2 EPOCHS=1 WORKERS=0 MODELS=test_resnet FROZEN=test_resnet \
#     bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
N=${N:-300}                 # JPEGs per class (10 classes)
PX=${PX:-"375 500"}         # their height and width: photo-sized, like the issue's
SIZE=${SIZE:-224} BATCH=${BATCH:-256} STEPS=${STEPS:-30} EPOCHS=${EPOCHS:-25} WORKERS=${WORKERS:-16}
MODELS=${MODELS:-"resnet50 vit_small_patch16_224.dino resnet18"} FROZEN=${FROZEN:-resnet50}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PGSHELL_CACHE=${PGSHELL_CACHE:-/tmp/pgshell-cache}
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"; fi
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_inputcache.py 2>&1 | tee "$OUT/gpu-tests.txt"
# a real JPEG folder (noise around a colour per class), made here
JPEGS=$(mktemp -d)/jpegs
N=$N PX="$PX" JPEGS=$JPEGS $PY - <<'PY'
import numpy as np, os
from PIL import Image
rng = np.random.default_rng(0)
h, w = map(int, os.environ["PX"].split())
for c in range(10):
    d = f"{os.environ['JPEGS']}/c{c}"; os.makedirs(d, exist_ok=True)
    base = rng.integers(0, 255, (3,), dtype=np.uint8)
    for i in range(int(os.environ["N"])):
        a = (base + rng.normal(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(f"{d}/{i}.jpg", quality=90)
PY
# the three input paths on the same folder: decoded cache, device decode (nvJPEG on a GPU), DataLoader (PIL workers)
$PY benchmarks/input_paths.py --data "$JPEGS" --model "${MODELS%% *}" --size "$SIZE" --batch "$BATCH" \
  --workers "$WORKERS" --steps "$STEPS" 2>&1 | tee -a "$OUT/bench.txt"
for m in $MODELS; do
  $PY benchmarks/seed_vs_engine.py --synthetic --model "$m" --size "$SIZE" --batch "$BATCH" --steps "$STEPS" 2>&1 \
    | tee -a "$OUT/bench.txt"
  $PY benchmarks/seed_vs_engine.py --data "$JPEGS" --model "$m" --size "$SIZE" --batch "$BATCH" --workers "$WORKERS" \
    --steps "$((2 * STEPS))" 2>&1 | tee -a "$OUT/bench.txt"
done
$PY benchmarks/seed_vs_engine.py --data "$JPEGS" --model "$FROZEN" --size "$SIZE" --mode frozen --epochs "$EPOCHS" \
  --workers "$WORKERS" --breakdown 2>&1 | tee -a "$OUT/bench.txt"
