#!/usr/bin/env bash
# GPU check (issue 6): the graph, meta-step and pruning-speed benchmarks on the GPU, then one
# fast demo pipeline with every Lightning stage on the GPU. About 5-8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default runs/gpu_check
#
# Needs the project installed (README set-up). Data: $METAPRUNE_DATA if set (e.g. a CIFAR-10
# copy), else a generated 10-class ImageFolder of random images (the demo's numbers then mean
# nothing; the check is that every stage runs on the device). Outputs, one file per step, go to
# OUT_DIR, plus OUT_DIR/summary.txt with the GPU's name: paste that into benchmarks/RESULTS.md.
# Without a GPU it says so and runs everything on the CPU (a dry run of the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}

DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
NAME=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: CPU dry run')")
echo "device: $DEVICE ($NAME), torch $($PY -c 'import torch; print(torch.__version__)')" | tee "$OUT/summary.txt"

step() {  # step NAME COMMAND...: run, keep the output, time it, stop on failure
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED ($name), see $OUT/$name.log" | tee -a "$OUT/summary.txt"; tail -20 "$OUT/$name.log"; exit 1; }
  grep -v "^\s*$" "$OUT/$name.log" | grep -iv "warn" | tail -12 | tee -a "$OUT/summary.txt"
  echo "-- $name: $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

step graph_speed $PY benchmarks/graph_speed.py --repeats 10 --device "$DEVICE"
if [ "$DEVICE" = cuda ]; then
  step meta_step $PY benchmarks/meta_step.py --device cuda
else  # the CPU dry run: small batches, so it takes seconds, not many minutes
  step meta_step $PY benchmarks/meta_step.py --device cpu --batch 20 --batches [1,2]
fi
step prune_speed $PY benchmarks/prune_speed.py --only resnet56

DATA=${METAPRUNE_DATA:-}
FAKE=0
if [ -z "$DATA" ]; then
  FAKE=1
  DATA="$OUT/fake_cifar10"
  $PY - "$DATA" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, count in (("train", 60), ("test", 20)):
    for c in range(10):
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            if not (folder / f"{i}.png").is_file():
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
EOF
fi
# The demo's configs with every stage on the GPU (accelerator auto) and the data root set.
$PY - "$OUT/demo_gpu.yaml" "$FAKE" <<'EOF'
import sys
from pathlib import Path

import yaml

demo = Path("configs/demo/demo.yaml")
cfg = yaml.safe_load(demo.read_text())
cfg["demo"]["configs"] = {k: str((demo.parent / v).resolve()) for k, v in cfg["demo"]["configs"].items()}
cfg["fast"]["zoo"]["pretrain"]["trainer"]["accelerator"] = "auto"
cfg["fast"]["meta"]["trainer"]["accelerator"] = "auto"
cfg["fast"]["prune"]["base"]["trainer"]["accelerator"] = "auto"
if sys.argv[2] == "1":  # the generated images: use them all
    cfg["data"] = {"subset": None, "test_subset": None}
Path(sys.argv[1]).write_text(yaml.safe_dump(cfg, sort_keys=False))
EOF
step demo_fast $PY prune.py demo --fast --config "$OUT/demo_gpu.yaml" --data_root "$DATA" --out "$OUT/demo"
echo "done: $OUT/summary.txt" | tee -a "$OUT/summary.txt"
