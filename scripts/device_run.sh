#!/usr/bin/env bash
# Run on a GPU host without a package registry: install the tree as a plain import path, run the GPU
# tests (and the CPU kernel's and worker's), then the benchmark (from the shim folder, so the checkout's
# hetegen_fx/ is not imported).
# Usage: bash scripts/device_run.sh [bench args...]
# Env: OUT (results folder), SHIM (the import folder; one per run at once), SKIP_TESTS=1, SKIP_BENCH=1, BENCH_TIMEOUT (s, default 480): a benchmark still
# running then prints every thread's Python stack (faulthandler) and, where cuda-gdb exists, every thread's
# native stack ($OUT/gdb.txt), and is killed; its log is $OUT/bench.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}
REPO=$(pwd)
SHIM=${SHIM:-/tmp/hetegen_shim}  # one per concurrent run
mkdir -p "$OUT"
rm -rf "$SHIM" && mkdir -p "$SHIM"
cp -r hetegen_fx "$SHIM/hetegen_fx" && cp -r passes "$SHIM/hetegen_fx/passes" && cp -r models "$SHIM/hetegen_fx/models"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0), torch.get_num_threads(), 'threads')"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the GPU tests, and the CPU kernel's and worker's (the kernel is built here, with this host's compiler)
  (cd "$SHIM" && timeout -s KILL 400 python3 -m pytest "$REPO/tests/test_gpu.py" "$REPO/tests/test_kernels.py" \
    "$REPO/tests/test_host.py" --rootdir "$REPO" -q -p no:cacheprovider -x 2>&1 | grep -v DEBUG | tail -60)
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  T=${BENCH_TIMEOUT:-480}
  (cd "$SHIM" && exec python3 -c "
import faulthandler, sys
faulthandler.dump_traceback_later($T, file=sys.stderr)
from hetegen_fx.cli import main
sys.exit(main(sys.argv[1:]))" bench --out "$OUT" "$@" >"$OUT/bench.log" 2>&1) &
  PID=$!
  for _ in $(seq 1 $((T + 5))); do sleep 1; kill -0 $PID 2>/dev/null || break; done
  if kill -0 $PID 2>/dev/null; then  # still running: native stacks of every thread too (CUDA driver calls)
    if command -v cuda-gdb >/dev/null; then
      timeout 90 cuda-gdb -p $PID -batch -ex "info threads" -ex "thread apply all bt 30" >"$OUT/gdb.txt" 2>&1
      echo "native stacks in $OUT/gdb.txt"
    fi
    kill -9 $PID
  fi
  wait $PID
  echo "bench exit code $?"
  grep -v "^\[transformers\]\|profiling" "$OUT/bench.log" | tail -80
fi
