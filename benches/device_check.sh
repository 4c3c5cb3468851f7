#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU: build fastcnn._cuda, run the GPU tests
# and the quick benchmark, and leave results.json, results.md and logs in the
# folder given as $1. That machine has no network and already has torch, Triton,
# pybind11, pytest and pytest-benchmark, so nothing is downloaded.
# Budget: under 9 minutes in total.
set -uo pipefail
OUT_DIR="${1:?usage: benches/device_check.sh OUTPUT_DIR}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

echo "== build (nvcc required)"
if ! FASTCNN_CUDA=1 timeout 240 "$PY" -m pip install --no-build-isolation --no-deps -q -e . \
    >"$OUT_DIR/build.log" 2>&1; then
  tail -30 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -c "import fastcnn, fastcnn._cuda as c; print('backends:', fastcnn.available_backends('cuda'), 'devices:', c.device_count())"

echo "== GPU tests"
# Only the tests that run on CUDA (the CPU ones ran in CI already). No run-time
# tuning: it would compile every candidate config for every new shape. Two
# budgets, so that the many Triton specialisations of the conv tests cannot
# starve the rest: the memory-bound ops first, then a conv/GEMM subset (odd
# geometries, dtypes, epilogues, each network kernel shape with few channels).
export FASTCNN_TRITON_TUNE=0
timeout 100 "$PY" -m pytest tests -q --maxfail=5 -k "cuda or compile" -p no:cacheprovider \
  --ignore=tests/test_conv2d.py --ignore=tests/test_linear.py --ignore=tests/test_models.py \
  --junitxml="$OUT_DIR/tests.xml" >"$OUT_DIR/tests.log" 2>&1 || status=1
tail -5 "$OUT_DIR/tests.log"
timeout 140 "$PY" -m pytest tests/test_conv2d.py tests/test_linear.py -q --maxfail=5 -p no:cacheprovider \
  -k "cuda and (odd_geometries or dtypes or epilogues or small or channel_slice or forward_backward or bottom_and_right)" \
  --junitxml="$OUT_DIR/tests-conv.xml" >"$OUT_DIR/tests-conv.log" 2>&1 || status=1
tail -5 "$OUT_DIR/tests-conv.log"
timeout 60 "$PY" -m pytest tests/test_models.py -q --maxfail=3 -p no:cacheprovider \
  -k "cuda and (lenet5 or resnet18 or googlenet)" \
  --junitxml="$OUT_DIR/tests-models.xml" >"$OUT_DIR/tests-models.log" 2>&1 || status=1
tail -5 "$OUT_DIR/tests-models.log"

echo "== quick benchmark: ops, then the networks (inference, batch 256, float16)"
timeout 60 "$PY" -m fastcnn bench --kernels --quick --json "$OUT_DIR/results.json" \
  --markdown "$OUT_DIR/results.md" >"$OUT_DIR/bench.log" 2>&1 || status=1
cat "$OUT_DIR/results.md" 2>/dev/null || tail -20 "$OUT_DIR/bench.log"
timeout 80 "$PY" -m fastcnn bench --mode infer --no-compile --json "$OUT_DIR/networks.json" \
  --markdown "$OUT_DIR/networks.md" >"$OUT_DIR/networks.log" 2>&1 || status=1
cat "$OUT_DIR/networks.md" 2>/dev/null || tail -20 "$OUT_DIR/networks.log"
# the target: ResNet-50 against torch.compile too
timeout 90 "$PY" -m fastcnn bench --nets resnet50 --mode infer --json "$OUT_DIR/resnet50-compile.json" \
  --markdown "$OUT_DIR/resnet50-compile.md" >"$OUT_DIR/resnet50-compile.log" 2>&1 || status=1
cat "$OUT_DIR/resnet50-compile.md" 2>/dev/null || tail -20 "$OUT_DIR/resnet50-compile.log"
exit $status
