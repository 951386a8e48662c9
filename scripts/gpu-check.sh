#!/usr/bin/env bash
# One call on the GPU machine (see README "Building"): builds the native tests with CMake and
# the CUDA sources for sm_90a (H100/H200), runs the CPU tests (ctest) and every CUDA test
# (native/tests/cuda_*.cpp), and leaves the logs and a JSON summary in OUT_DIR.
#   bash scripts/gpu-check.sh "$OUT"
set -uo pipefail
out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
build=build-gpu
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1
} > "$out/device.txt" 2>&1

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a > "$out/build.log" 2>&1
configure_rc=$?
# Which cuBLASLt the build uses (the toolkit's, a pip wheel's, or none: then cuda_gemm is not built).
grep -h 'redflag: cuBLASLt' "$out/build.log" >> "$out/device.txt" ||
  echo "redflag: no cuBLASLt line in the configure log" >> "$out/device.txt"
if [ "$configure_rc" -ne 0 ] || ! cmake --build "$build" -j "$(nproc)" >> "$out/build.log" 2>&1; then
  echo '{"build": "failed"}' > "$out/summary.json"
  tail -40 "$out/build.log"
  exit 1
fi

ctest --test-dir "$build" -j "$(nproc)" --output-on-failure > "$out/ctest.log" 2>&1
ctest_rc=$?
results=()
for t in "$build"/cuda_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  "$t" > "$out/$name.log" 2>&1
  rc=$?
  results+=("\"$name\": $rc")
  tail -3 "$out/$name.log"
done
printf '{"build": "ok", "ctest": %d, "cuda": {%s}}\n' "$ctest_rc" "$(IFS=,; echo "${results[*]}")" > "$out/summary.json"
cat "$out/summary.json"
tail -3 "$out/ctest.log"
