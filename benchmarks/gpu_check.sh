#!/usr/bin/env bash
# One prepared GPU check (see ../shared/device/README.md): GPU-marked tests, then the benchmarks, results under $OUT.
# On the device machine:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#                         export PYTHONPATH=$PWD:/tmp/site && bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PGSHELL_CACHE=/tmp/pgshell-cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
# a real JPEG folder like the issue's (~500x375 photos), made here: 10 classes x 300
python3 - <<'PY'
import numpy as np, os
from PIL import Image
rng = np.random.default_rng(0)
for c in range(10):
    d = f"/tmp/jpegs/c{c}"; os.makedirs(d, exist_ok=True)
    base = rng.integers(0, 255, (3,), dtype=np.uint8)
    for i in range(300):
        a = (base + rng.normal(0, 40, (375, 500, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(f"{d}/{i}.jpg", quality=90)
PY
for m in resnet50 vit_small_patch16_224.dino resnet18; do
  python3 benchmarks/seed_vs_engine.py --synthetic --model $m --size 224 --batch 256 --steps 30 2>&1 | tee -a "$OUT/bench.txt"
  python3 benchmarks/seed_vs_engine.py --data /tmp/jpegs --model $m --size 224 --batch 256 --workers 16 --steps 60 \
    2>&1 | tee -a "$OUT/bench.txt"
done
python3 benchmarks/seed_vs_engine.py --data /tmp/jpegs --model resnet50 --size 224 --mode frozen --epochs 25 \
  --workers 16 2>&1 | tee -a "$OUT/bench.txt"
