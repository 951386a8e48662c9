#!/usr/bin/env bash
# One call on the GPU machine (see README "Building"): builds the native tests with CMake and
# the CUDA sources for sm_90a (H100/H200), runs every CUDA test (native/tests/cuda_*.cpp) and
# the GPU benchmark (native/bench/cuda_bench.cu) and its PyTorch peer, and, when .gpu-pack is
# carried (scripts/gpu-pack.sh), the library end to end on the GPU (scripts/device-e2e.mjs,
# training: scripts/device-train-e2e.mjs, the evaluation: scripts/device-eval-e2e.mjs); it
# leaves the logs, the JSON results and a summary in OUT_DIR. Order: cheapest first, so a
# timeout still returns the tests. RF_GPU_CHECK_BENCH=0 skips the benchmarks, RF_GPU_CHECK_TESTS=0
# the tests; RF_GPU_CHECK_SANITIZE=1 runs the kernel tests under compute-sanitizer;
# RF_GPU_CHECK_DEMO=1 adds `redflag demo --small --device cuda` after the end-to-end tests.
# RF_GPU_CHECK_DEADLINE (seconds, default 540): the whole call's budget, under the device tool's
# timeout; no stage runs past it, and the logs are packed after every stage. RF_GPU_CHECK_BUILD=0
# runs what an earlier call built (in RF_GPU_CHECK_BUILD_DIR, default build-gpu) without
# configuring or building again (test/gpu-check.test.ts runs the script that way on stand-ins).
#   bash scripts/gpu-check.sh "$OUT"
set -uo pipefail
dest="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
mkdir -p "$dest"
# The device tool returns at most 8 files from OUT: everything goes to a work folder, packed into
# OUT/gpu-check.tar.xz (with summary.json beside it) after every stage and when the script ends:
# a call the tool kills at its timeout (no exit trap runs) still returns the stages before.
out=$(mktemp -d /tmp/rf-gpu-check.XXXXXX)
# Each part's exit status (-1: not run, -2: no time left, -3: ran but saw no GPU), whether the
# tests saw a GPU (gpu: ok, none or unknown), and the summary of them so far.
build_state=running
gpu_state=unknown
ctest_rc=-1 addon_rc=-1 e2e_rc=-1 train_e2e_rc=-1 eval_e2e_rc=-1 interop_rc=-1 bench_rc=-1 peer_rc=-1 train_bench_rc=-1 train_peer_rc=-1
llmc_rc=-1 serve_rc=-1 demo_rc=-1
results=()
save() {
  [ "$build_state" = failed ] ||
    printf '{"build": "%s", "gpu": "%s", "ctest": %d, "cuda": {%s}, "addon": %d, "e2e": %d, "trainE2e": %d, "evalE2e": %d, "interop": %d, "bench": %d, "peer": %d, "trainBench": %d, "trainPeer": %d, "llmc": %d, "serve": %d, "demo": %d}\n' \
      "$build_state" "$gpu_state" "$ctest_rc" "$(IFS=,; echo "${results[*]}")" "$addon_rc" "$e2e_rc" "$train_e2e_rc" "$eval_e2e_rc" "$interop_rc" "$bench_rc" \
      "$peer_rc" "$train_bench_rc" "$train_peer_rc" "$llmc_rc" "$serve_rc" "$demo_rc" > "$out/summary.json"
  cp -f "$out/summary.json" "$dest/" 2>/dev/null
  tar -cJf "$dest/gpu-check.tar.xz.part" -C "$out" . 2>/dev/null && mv -f "$dest/gpu-check.tar.xz.part" "$dest/gpu-check.tar.xz"
}
trap save EXIT
# The deadline: each stage's time limit is cut to what is left of RF_GPU_CHECK_DEADLINE (less 15 s
# to pack), and a stage with under 20 s left does not start (status -2).
start=$(date +%s)
deadline=${RF_GPU_CHECK_DEADLINE:-540}
# stage SECONDS COMMAND...: COMMAND under min(SECONDS, what is left); its status in rc; then save.
stage() {
  local left=$((deadline - ($(date +%s) - start) - 15)) limit=$1
  shift
  if [ "$left" -lt 20 ]; then
    rc=-2
    echo "gpu-check: no time left for: $*" >&2
  else
    [ "$limit" -gt "$left" ] && limit=$left
    timeout "$limit" "$@"
    rc=$?
  fi
  save
}
# A CUDA test or benchmark that sees no GPU says so and exits 0 (CI's way, where none is); here that
# is no result (-3), and the summary says the machine showed no GPU: a driver older than the
# toolkit, say, must not read as every test passing.
saw_no_gpu() { grep -q "no CUDA device visible" "$1" 2> /dev/null; }
cd "$(dirname "$0")/.."
build=${RF_GPU_CHECK_BUILD_DIR:-build-gpu}
rebuild=${RF_GPU_CHECK_BUILD:-1}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1
} > "$out/device.txt" 2>&1

# The carried node and production node_modules (scripts/gpu-pack.sh; carry .gpu-pack), unpacked
# first: the addon's configure asks node for node-addon-api's headers, and one build then makes
# both the C++ tests and the addon, compiling the CUDA sources once.
addon_args=()
if [ -f .gpu-pack/node.xz ] && [ -f .gpu-pack/modules.tar.xz ]; then
  mkdir -p /tmp/rf-node/bin
  xz -dc .gpu-pack/node.xz > /tmp/rf-node/bin/node && chmod +x /tmp/rf-node/bin/node
  tar -xJf .gpu-pack/modules.tar.xz
  export PATH="/tmp/rf-node/bin:$PATH"
  addon_args=(-DREDFLAG_ADDON=ON -DCMAKE_JS_INC="$PWD/node_modules/node-api-headers/include")
fi
if [ "$rebuild" = 0 ]; then
  if [ -d "$build" ]; then
    echo "gpu-check: RF_GPU_CHECK_BUILD=0: running what $build holds" > "$out/build.log"
    build_rc=0
  else
    echo "gpu-check: RF_GPU_CHECK_BUILD=0, but there is no $build to run" | tee "$out/build.log" >&2
    build_rc=2
  fi
else
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a "${addon_args[@]}" \
    > "$out/build.log" 2>&1
  configure_rc=$?
  # The CUDA tests and benchmarks only (target gpu_check), unless the CPU tests run too.
  targets=(--target gpu_check)
  [ "${RF_GPU_CHECK_CTEST:-0}" = 1 ] && targets=()
  # Which cuBLASLt the build uses (the toolkit's, a pip wheel's, or none: then cuda_gemm is not built).
  grep -h 'redflag: cuBLASLt' "$out/build.log" >> "$out/device.txt" ||
    echo "redflag: no cuBLASLt line in the configure log" >> "$out/device.txt"
  build_rc=$configure_rc
  [ "$configure_rc" -eq 0 ] && { stage 420 cmake --build "$build" -j "$(nproc)" "${targets[@]}" >> "$out/build.log" 2>&1; build_rc=$rc; }
fi
if [ "$build_rc" -ne 0 ]; then
  build_state=failed
  echo "{\"build\": \"failed\", \"status\": $build_rc}" > "$out/summary.json"
  tail -40 "$out/build.log"
  exit 1
fi
build_state=ok

# The CPU tests are CI's (here they only cost device time): RF_GPU_CHECK_CTEST=1 runs them too.
if [ "${RF_GPU_CHECK_CTEST:-0}" = 1 ]; then
  stage 300 ctest --test-dir "$build" -j "$(nproc)" --output-on-failure > "$out/ctest.log" 2>&1
  ctest_rc=$rc
fi
# RF_GPU_CHECK_TESTS=0 skips the tests (the C++ ones, end to end, interop): a second call on the
# same warm machine that only runs the benchmarks (the build is kept between calls).
tests=${RF_GPU_CHECK_TESTS:-1}
for t in "$build"/cuda_*; do
  [ "$tests" = 0 ] && break
  [ -x "$t" ] || continue
  name=$(basename "$t")
  case "$name" in cuda_bench | cuda_train_bench) continue ;; esac
  stage 300 "$t" > "$out/$name.log" 2>&1
  if [ "$rc" -eq 0 ] && saw_no_gpu "$out/$name.log"; then
    rc=-3 gpu_state=none
  elif [ "$rc" -ge 0 ] && [ "$gpu_state" = unknown ]; then
    gpu_state=ok
  fi
  results+=("\"$name\": $rc")
  tail -3 "$out/$name.log"
  # A failure, once more with every kernel waiting for the previous one (cuda/launch.h): whether
  # the dependent launches are what failed.
  if [ "$rc" -gt 0 ]; then
    stage 300 env RF_CUDA_PDL=0 "$t" > "$out/$name.serial.log" 2>&1
    results+=("\"$name with RF_CUDA_PDL=0\": $rc")
  fi
done
# RF_GPU_CHECK_SANITIZE=1 (a call of its own: RF_GPU_CHECK_TESTS=0 RF_GPU_CHECK_BENCH=0 on the
# warm machine): the kernel tests under NVIDIA's compute-sanitizer, which sees what the CPU
# emulation cannot: memcheck (out-of-bounds and misaligned device accesses), racecheck (shared
# memory races between real warps) and synccheck (barriers and warp shuffles some threads miss).
# Where compute-sanitizer cannot read the GPU (gVisor machines), each says so in its log.
if [ "${RF_GPU_CHECK_SANITIZE:-0}" = 1 ]; then
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck synccheck; do
      for name in cuda_ops cuda_gemv cuda_attention cuda_rf_loss cuda_model_ops cuda_ops_backward cuda_attention_backward cuda_train_ops cuda_optim; do
        [ -x "$build/$name" ] || continue
        stage 150 compute-sanitizer --tool "$tool" --error-exitcode 3 "$build/$name" > "$out/sanitize-$tool-$name.log" 2>&1
        results+=("\"$tool $name\": $rc")
        grep -m 3 -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|race|Barrier" "$out/sanitize-$tool-$name.log"
      done
    done
  else
    results+=("\"sanitize\": -3")
    echo "gpu-check: compute-sanitizer is not on this machine" >&2
  fi
fi
# The CUDA addon (for the end-to-end tests and gpu-serve), linked in the same build from the
# objects the tests used.
addon=
if [ ${#addon_args[@]} -gt 0 ]; then
  if [ "$rebuild" = 0 ]; then
    addon_rc=0
    [ -n "$(find "$build" -name redflag_cuda.node | head -1)" ] || addon_rc=2
  else
    stage 300 cmake --build "$build" -j "$(nproc)" --target redflag_cuda > "$out/addon-build.log" 2>&1
    addon_rc=$rc
  fi
  if [ "$addon_rc" -eq 0 ]; then
    addon=$(realpath "$(find "$build" -name redflag_cuda.node | head -1)")
  else
    tail -20 "$out/addon-build.log"
  fi
fi
# The library end to end on the GPU (scripts/device-e2e.mjs) with the carried node.
if [ -n "$addon" ] && [ "$tests" != 0 ]; then
  stage 300 env REDFLAG_ADDON="$addon" node scripts/device-e2e.mjs --device cuda > "$out/e2e.json" 2> "$out/e2e.log"
  e2e_rc=$rc
  head -c 1500 "$out/e2e.json"
  # Training on the GPU against the CPU (RF_GPU_CHECK_TRAIN_INTEGRATION=1 adds the integration
  # test's pipeline with both adapters on the GPU: a few minutes).
  integration=()
  [ "${RF_GPU_CHECK_TRAIN_INTEGRATION:-0}" = 1 ] && integration=(--integration)
  stage 480 env REDFLAG_ADDON="$addon" node scripts/device-train-e2e.mjs --device cuda "${integration[@]}" \
    > "$out/train-e2e.json" 2> "$out/train-e2e.log"
  train_e2e_rc=$rc
  head -c 1200 "$out/train-e2e.json"
  # The evaluation's suites (white-box attacks and the fine-tuning attack included) against the CPU.
  stage 240 env REDFLAG_ADDON="$addon" node scripts/device-eval-e2e.mjs --device cuda > "$out/eval-e2e.json" 2> "$out/eval-e2e.log"
  eval_e2e_rc=$rc
  head -c 1200 "$out/eval-e2e.json"
  # PEFT interoperability: an adapter trained by redflag loads with PeftModel.from_pretrained and
  # gives redflag's logits (CPU and GPU), test/reference/peft_interop.py.
  stage 300 env REDFLAG_ADDON="$addon" node scripts/interop-export.mjs /tmp/rf-interop --device cuda > "$out/interop-export.log" 2>&1
  if [ "$rc" -eq 0 ]; then
    stage 180 python3 test/reference/peft_interop.py /tmp/rf-interop/interop.json > "$out/interop.json" 2>> "$out/interop-export.log"
    interop_rc=$rc
    head -c 1200 "$out/interop.json"
  else
    interop_rc=2
    tail -5 "$out/interop-export.log"
  fi
fi
# RF_GPU_CHECK_DEMO=1 (also in a call with RF_GPU_CHECK_TESTS=0): the README's main job with its
# adapters, detector and evaluation on the GPU (redflag demo --small --device cuda; the language
# model trains on the CPU's cores).
if [ -n "$addon" ] && [ "${RF_GPU_CHECK_DEMO:-0}" = 1 ]; then
  stage 420 env REDFLAG_ADDON="$addon" node dist/cli.js demo --small --device cuda --threads "$(nproc)" --out /tmp/rf-demo \
    > "$out/demo.json" 2> "$out/demo.log"
  demo_rc=$rc
  tail -12 "$out/demo.log"
fi
# The benchmark (JSON on stdout, progress on stderr): RF_GPU_CHECK_BENCH=0 skips it, "quick" shortens it.
bench_args=()
[ "${RF_GPU_CHECK_BENCH:-1}" = quick ] && bench_args=(--quick)
if [ -x "$build/cuda_bench" ] && [ "${RF_GPU_CHECK_BENCH:-1}" != 0 ]; then
  stage 420 "$build/cuda_bench" "${bench_args[@]}" > "$out/cuda_bench.json" 2> "$out/cuda_bench.log"
  bench_rc=$rc
  [ "$rc" -eq 0 ] && saw_no_gpu "$out/cuda_bench.json" && bench_rc=-3 gpu_state=none
  tail -12 "$out/cuda_bench.log"
fi
# The GPU trainer's bench (LoRA step on 1B / 3B shapes, the fused loss alone) and its PyTorch +
# PEFT peer (bench/peers/torch_gpu_train.py, the same batch and loss mix).
if [ -x "$build/cuda_train_bench" ] && [ "${RF_GPU_CHECK_BENCH:-1}" != 0 ]; then
  stage 420 "$build/cuda_train_bench" "${bench_args[@]}" > "$out/cuda_train_bench.json" 2> "$out/cuda_train_bench.log"
  train_bench_rc=$rc
  [ "$rc" -eq 0 ] && saw_no_gpu "$out/cuda_train_bench.json" && train_bench_rc=-3 gpu_state=none
  tail -16 "$out/cuda_train_bench.log"  # step times, their phase breakdowns, the loss
  peer_args=()
  [ "${RF_GPU_CHECK_BENCH:-1}" = quick ] && peer_args=(--batch 4 --tokens 512 --steps 2)
  stage 420 python3 bench/peers/torch_gpu_train.py "${peer_args[@]}" > "$out/torch_gpu_train.json" 2> "$out/torch_gpu_train.log"
  train_peer_rc=$rc
  tail -4 "$out/torch_gpu_train.log"
fi
# llm.c's CUDA trainer on the same GPU, the peer of cuda_train_bench's full fine-tuning of GPT-2
# 124M (scripts/llmc-peer.sh; needs .gpu-pack/llmc.tar.xz).
if [ -f .gpu-pack/llmc.tar.xz ] && [ "${RF_GPU_CHECK_BENCH:-1}" != 0 ]; then
  stage 420 env LLMC_STEPS="$([ "${RF_GPU_CHECK_BENCH:-1}" = quick ] && echo 6 || echo 12)" bash scripts/llmc-peer.sh "$out" \
    > "$out/llmc.json" 2> "$out/llmc-peer.log"
  llmc_rc=$rc
  head -c 600 "$out/llmc.json"
fi
# The peer on the same GPU: PyTorch + transformers, bf16, static cache, torch.compile where it works.
if [ "${RF_GPU_CHECK_BENCH:-1}" != 0 ]; then
  stage 420 python3 bench/peers/torch_gpu.py > "$out/torch_gpu.json" 2> "$out/torch_gpu.log"
  peer_rc=$rc
  tail -6 "$out/torch_gpu.log"
fi
# The server over HTTP on the GPU (npm run bench -- gpu-serve: Llama-3.2-1B shapes, bf16, 1 / 32 /
# 128 streams), with the carried node and tsx.
if [ -n "${addon:-}" ] && [ "${RF_GPU_CHECK_BENCH:-1}" != 0 ]; then
  stage 300 env REDFLAG_ADDON="$addon" node --import tsx bench/run.ts gpu-serve > "$out/gpu-serve.json" 2> "$out/gpu-serve.log"
  serve_rc=$rc
  tail -c 1500 "$out/gpu-serve.json"
fi
save
cat "$out/summary.json"
