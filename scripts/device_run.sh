#!/usr/bin/env bash
# Run on the lent GPU host (no package registry there): install the tree as a plain import path,
# run the GPU tests, then the benchmark (from the shim folder, so the checkout's hetegen_fx/ is not imported). Usage: bash scripts/device_run.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}
REPO=$(pwd)
SHIM=/tmp/hetegen_shim
rm -rf "$SHIM" && mkdir -p "$SHIM"
cp -r hetegen_fx "$SHIM/hetegen_fx" && cp -r passes "$SHIM/hetegen_fx/passes" && cp -r models "$SHIM/hetegen_fx/models"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0), torch.get_num_threads(), 'threads')"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  (cd "$SHIM" && python3 -m pytest "$REPO/tests/test_gpu.py" --rootdir "$REPO" -q -p no:cacheprovider -x 2>&1 | grep -v DEBUG | tail -60)
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  (cd "$SHIM" && python3 -m hetegen_fx.cli bench --out "$OUT" "$@" 2>&1 | grep -v "^\[transformers\]")
fi
