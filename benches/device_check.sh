#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU: build fastcnn's CUDA module in place, run the
# GPU tests, compute-sanitizer over the cuda backend, and the benchmarks; leave logs and
# results packed in one archive, device-check.tgz, in the folder given as $1. That
# machine has no network and already has torch, Triton, pybind11, pytest, pytest-xdist
# and pytest-benchmark.
#
#   benches/device_check.sh OUT [SECONDS] [PHASES]
#
# SECONDS (default 450) is the whole run's budget: each phase gets at most its own
# share and never more than what is left. PHASES (default "tests sanitize nets") picks
# among:
#   tests      pytest on CUDA (-k "$DEVICE_TESTS", default "cuda"), 12 processes
#   sanitize   compute-sanitizer memcheck of the cuda backend ($DEVICE_SANITIZE dtypes)
#   tune       benches/tune_triton.py on $DEVICE_TUNE_NETS (default resnet50), float16,
#              forward kernels, 6 candidates each: the table it writes (also copied to
#              results/) is what the later phases of the run use
#   host       benches/host_profile.py on the first of $DEVICE_BACKENDS (else the default
#              backend): a few layers' host time, kernel time and kernels per call,
#              fastcnn against eager, and the host's hottest functions
#   nets       the networks' inference, batch 256, float16, against eager
#   graphs     the same with every contender replayed from a CUDA graph (kernels
#              without the host's per-op cost; fastcnn's output checked from a replay)
#   compile    ResNet-50 inference against eager and torch.compile
#   layers     every conv/FC layer of $DEVICE_LAYER_NETS (default all), float16, forward
#   backward   the same layers forward + backward (issue 3's 0.8x target), of
#              $DEVICE_BACKWARD_NETS (default resnet50)
#   kernels    the memory-bound ops' cases (--kernels --quick): bandwidth against the copy
# $DEVICE_BACKENDS (default: every GPU backend) limits the benchmarks' backends.
# The CPU module is not built (FASTCNN_CPU=0). CUDA objects compiled beforehand by the
# same nvcc can be carried in build/temp.linux-x86_64-cpython-3XX/cuda with a stamp of
# the sources they were built from, made beside them when they are built:
#   (cd build/temp.linux-x86_64-cpython-312/cuda && sha256sum "$OLDPWD"/setup.py \
#     "$OLDPWD"/kernels/cuda/* "$OLDPWD"/kernels/include/fastcnn/* | sed "s|$OLDPWD/||" >sources.sha256)
# They are reused only where the stamp still matches the tree; else nvcc runs.
set -uo pipefail
OUT_DIR="${1:?usage: benches/device_check.sh OUTPUT_DIR [SECONDS] [PHASES]}"
BUDGET="${2:-450}"
PHASES="${3:-tests sanitize nets}"
# Everything lands in one archive (a lent machine hands back only a few files):
# logs/ and results/ (the benchmarks' JSON and markdown, a tuned-config table).
LOGS="$OUT_DIR/logs"
RESULTS="$OUT_DIR/results"
mkdir -p "$LOGS" "$RESULTS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# No run-time tuning: it would compile every candidate config for every new shape.
export FASTCNN_TRITON_TUNE=0
BACKEND_ARGS=()
[[ -n "${DEVICE_BACKENDS:-}" ]] && BACKEND_ARGS=(--backends $DEVICE_BACKENDS)
# "${A[@]}" of an empty array fails under set -u before bash 4.4: ${A[@]+"${A[@]}"} does not.
START=$SECONDS
status=0

left() { echo $((BUDGET - (SECONDS - START))); }
# budget SECONDS: the phase's limit, capped by what is left of the run.
budget() { local l; l=$(left); (( l < $1 )) && echo $((l > 5 ? l - 5 : 1)) || echo "$1"; }
phase() { echo "== $1 (t=$((SECONDS - START)) s)"; }
wants() { [[ " $PHASES " == *" $1 "* ]]; }
pack() { tar czf "$OUT_DIR/device-check.tgz" -C "$OUT_DIR" logs results 2>/dev/null && rm -rf "$LOGS" "$RESULTS"; }
trap pack EXIT

phase "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

phase "build fastcnn._cuda (nvcc required)"
for stamp in build/temp.*/cuda/sources.sha256; do
  # Carried objects of these very sources: newer than the sources again, so setup.py keeps them.
  [[ -f "$stamp" ]] && sha256sum --quiet -c "$stamp" && touch "$(dirname "$stamp")"/*.o \
    && echo "reusing the carried CUDA objects"
done
if ! FASTCNN_CPU=0 FASTCNN_CUDA=1 timeout "$(budget 150)" "$PY" setup.py -q build_ext --inplace -j "$(nproc)" \
    >"$LOGS/build.log" 2>&1; then
  tail -30 "$LOGS/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -c "import fastcnn, fastcnn._cuda as c; print('backends:', fastcnn.available_backends('cuda'), 'devices:', c.device_count())" || status=1

if wants tests; then
  phase "GPU tests: -k '${DEVICE_TESTS:-cuda}'"
  # SIGINT at the limit, so that pytest still prints its summary of what ran.
  timeout -s INT -k 20 "$(budget 150)" "$PY" -m pytest tests -q -n 12 -p no:cacheprovider \
    -k "${DEVICE_TESTS:-cuda}" -rfE --tb=short --junitxml="$LOGS/tests.xml" >"$LOGS/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | cut -c1-220 | head -40
  tail -1 "$LOGS/tests.log"
fi

if wants sanitize; then
  phase "compute-sanitizer memcheck of the cuda backend: ${DEVICE_SANITIZE:-float32 float16}"
  timeout -k 10 "$(budget 60)" compute-sanitizer --tool memcheck --print-limit 20 \
    "$PY" benches/gpu_sanitize.py ${DEVICE_SANITIZE:-float32 float16} >"$LOGS/sanitize.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|Invalid|sanitize:" "$LOGS/sanitize.log" | head -60
  grep -q "ERROR SUMMARY" "$LOGS/sanitize.log" || tail -5 "$LOGS/sanitize.log"
fi

if wants tune; then
  phase "tune the Triton forward kernels of ${DEVICE_TUNE_NETS:-resnet50}, float16"
  limit=$(budget 240)
  # The script writes the table after every layer and starts none past its deadline.
  FASTCNN_TRITON_TUNE=1 timeout -k 10 "$limit" "$PY" benches/tune_triton.py --nets ${DEVICE_TUNE_NETS:-resnet50} --dtypes float16 \
    --kernels conv2d_forward linear --max-configs 6 --deadline $((limit > 90 ? limit - 60 : limit / 2)) \
    >"$LOGS/tune.log" 2>&1 || status=1
  tail -3 "$LOGS/tune.log"
  cp fastcnn/triton/tuned/*.json "$RESULTS/" 2>/dev/null
fi

if wants host; then
  phase "host time against kernel time per call, a few layers, float16"
  timeout -s INT -k 10 "$(budget 60)" "$PY" benches/host_profile.py "$RESULTS" ${DEVICE_BACKENDS:+--backend ${DEVICE_BACKENDS%% *}} \
    >"$LOGS/host.log" 2>&1 || status=1
  cat "$LOGS/host.log" | tail -12
fi

if wants nets; then
  phase "the networks, inference, batch 256, float16: eager and fastcnn"
  timeout -s INT -k 10 "$(budget 120)" "$PY" -m fastcnn bench --nets resnet50 lenet5 alexnet vgg16 resnet18 googlenet \
    --mode infer --dtype float16 --no-compile ${BACKEND_ARGS[@]+"${BACKEND_ARGS[@]}"} \
    --json "$RESULTS/networks-infer.json" --markdown "$RESULTS/networks-infer.md" >"$LOGS/networks.log" 2>&1 || status=1
  cat "$RESULTS/networks-infer.md" 2>/dev/null || tail -20 "$LOGS/networks.log"
fi

if wants graphs; then
  phase "the networks, inference, batch 256, float16, replayed from CUDA graphs"
  timeout -s INT -k 10 "$(budget 120)" "$PY" -m fastcnn bench --nets resnet50 lenet5 alexnet vgg16 resnet18 googlenet \
    --mode infer --dtype float16 --no-compile --cuda-graphs ${BACKEND_ARGS[@]+"${BACKEND_ARGS[@]}"} \
    --json "$RESULTS/networks-infer-graphs.json" --markdown "$RESULTS/networks-infer-graphs.md" \
    >"$LOGS/networks-graphs.log" 2>&1 || status=1
  cat "$RESULTS/networks-infer-graphs.md" 2>/dev/null || tail -20 "$LOGS/networks-graphs.log"
fi

if wants compile; then
  phase "ResNet-50 inference, batch 256, float16: eager, torch.compile, fastcnn"
  timeout -s INT -k 10 "$(budget 120)" "$PY" -m fastcnn bench --nets resnet50 --mode infer --dtype float16 \
    ${BACKEND_ARGS[@]+"${BACKEND_ARGS[@]}"} --json "$RESULTS/resnet50-compile.json" --markdown "$RESULTS/resnet50-compile.md" \
    >"$LOGS/resnet50-compile.log" 2>&1 || status=1
  cat "$RESULTS/resnet50-compile.md" 2>/dev/null || tail -20 "$LOGS/resnet50-compile.log"
fi

if wants layers; then
  phase "conv and FC layers of ${DEVICE_LAYER_NETS:-every network}, float16, channels_last, forward"
  NET_ARGS=()
  [[ -n "${DEVICE_LAYER_NETS:-}" ]] && NET_ARGS=(--nets $DEVICE_LAYER_NETS)
  timeout -s INT -k 10 "$(budget 150)" "$PY" -m fastcnn bench --layers --dtype float16 ${NET_ARGS[@]+"${NET_ARGS[@]}"} \
    ${BACKEND_ARGS[@]+"${BACKEND_ARGS[@]}"} --json "$RESULTS/layers-fwd.json" --markdown "$RESULTS/layers-fwd.md" \
    >"$LOGS/layers.log" 2>&1 || status=1
  tail -25 "$RESULTS/layers-fwd.md" 2>/dev/null || tail -20 "$LOGS/layers.log"
fi

if wants backward; then
  phase "conv and FC layers of ${DEVICE_BACKWARD_NETS:-resnet50}, float16, channels_last, forward + backward"
  timeout -s INT -k 10 "$(budget 120)" "$PY" -m fastcnn bench --layers --backward --dtype float16 \
    --nets ${DEVICE_BACKWARD_NETS:-resnet50} ${BACKEND_ARGS[@]+"${BACKEND_ARGS[@]}"} \
    --json "$RESULTS/layers-fwd-bwd.json" --markdown "$RESULTS/layers-fwd-bwd.md" >"$LOGS/layers-bwd.log" 2>&1 || status=1
  tail -25 "$RESULTS/layers-fwd-bwd.md" 2>/dev/null || tail -20 "$LOGS/layers-bwd.log"
fi

if wants kernels; then
  phase "the ops' cases, quick: bandwidth as a fraction of the measured copy"
  timeout -s INT -k 10 "$(budget 90)" "$PY" -m fastcnn bench --kernels --quick ${BACKEND_ARGS[@]+"${BACKEND_ARGS[@]}"} \
    --json "$RESULTS/kernels.json" --markdown "$RESULTS/kernels.md" >"$LOGS/kernels.log" 2>&1 || status=1
  tail -25 "$RESULTS/kernels.md" 2>/dev/null || tail -20 "$LOGS/kernels.log"
fi

phase "done, status $status"
exit $status
