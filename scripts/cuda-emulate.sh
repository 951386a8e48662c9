#!/usr/bin/env bash
# Runs the CUDA tests on the CPU under the emulation in native/tests/emulate (no GPU, no nvcc: g++
# and python3), so every CI run executes the kernels' and the CUDA engine's logic against the CPU
# references, as a GPU machine does with the real thing (scripts/gpu-check.sh). cuBLASLt is
# emulated from its documented semantics (native/tests/emulate/cublaslt.cpp), so cuda/gemm.cu runs
# too; see native/tests/emulate/emu.cpp for what emulation cannot catch.
# Needs the CPU libraries of build-native (npm run test:native builds them first, then calls this).
#   bash scripts/cuda-emulate.sh [TEST...]     (default: all; names as in native/tests/emulate/run_*.cpp)
set -uo pipefail
cd "$(dirname "$0")/.."
lib=build-native
out=build-emu
emu=native/tests/emulate
for a in librf_core.a librf_kernels_avx2.a librf_kernels_avx512.a; do
  [ -f "$lib/$a" ] || { echo "cuda-emulate: $lib/$a is missing: build the native tests first (npm run test:native)" >&2; exit 1; }
done
mkdir -p "$out/src" "$out/include/cuda"
for f in native/cuda/*.cu "$emu"/*.cu; do
  python3 "$emu/translate.py" "$f" "$out/src/$(basename "$f" .cu).cpp" || exit 1
done
# Device headers (launches in templates) are translated too, found before native/'s own.
for f in native/cuda/*.cuh; do
  python3 "$emu/translate.py" "$f" "$out/include/cuda/$(basename "$f")" || exit 1
done
# cuda/gemm.cu's cuBLASLt declarations: the subset header (its enum values are the emulation's).
cp native/cuda/check/cublasLt.h "$out/include/" || exit 1
# The GPU benchmarks (run with --tiny), and their shared header, which launches a kernel.
mkdir -p "$out/include/bench"
for f in native/bench/cuda_*.cu; do
  python3 "$emu/translate.py" "$f" "$out/src/$(basename "$f" .cu).cpp" || exit 1
done
python3 "$emu/translate.py" native/bench/cuda_bench_common.h "$out/include/bench/cuda_bench_common.h" || exit 1
# -fsanitize=alignment: a misaligned vector access, which runs on x86 and faults on a GPU, stops
# the test with its line (see emu.cpp).
flags=(-std=c++17 -O2 -w -fsanitize=alignment -fno-sanitize-recover=alignment -I"$emu" -I"$out/include" -Inative)
g++ "${flags[@]}" -c "$emu/emu.cpp" -o "$out/emu.o" || exit 1
# The device sources each test needs (translated), besides the emulated runtime.
declare -A sources=(
  [emulator]="emulator_test"
  [ops]="ops"
  [ops_backward]="ops_backward train_ops model_ops"
  [optim]="optim"
  [attention]="attention attention_tc paged_cache ops"
  [attention_backward]="attention_backward attention_backward_tc"
  [rf_loss]="rf_loss model_ops memory gemm"
  [model_ops]="model_ops ops"
  [gemv]="gemv ops paged_cache"
  [gemm]="gemm memory"
  [train_ops]="train_ops"
  [model]="ops attention attention_tc paged_cache model_ops train_ops gemv memory gemm device_model phase_clock"
  [train]="ops ops_backward optim attention attention_tc attention_backward attention_backward_tc paged_cache model_ops train_ops gemv memory gemm collective rf_loss device_model device_trainer phase_clock"
  [bench]="cuda_bench ops attention attention_tc paged_cache model_ops train_ops gemv memory gemm device_model phase_clock"
  [train_bench]="cuda_train_bench ops ops_backward optim attention attention_tc attention_backward attention_backward_tc paged_cache model_ops train_ops gemv memory gemm collective rf_loss device_model device_trainer phase_clock"
)
declare -A stand_in=([emulator]="$emu/cublaslt.cpp" [gemm]="$emu/cublaslt.cpp" [rf_loss]="$emu/cublaslt.cpp" [model]="$emu/cublaslt.cpp"
  [train]="$emu/cublaslt.cpp" [bench]="$emu/cublaslt.cpp" [train_bench]="$emu/cublaslt.cpp")
# The benchmarks print one JSON object, which check_bench.py checks and tallies.
declare -A bench_kind=([bench]=cuda [train_bench]=cuda-train)
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(emulator ops ops_backward optim attention attention_backward rf_loss model_ops gemv gemm train_ops model train bench train_bench)
build_one() {
  local t=$1 srcs=()
  for s in ${sources[$t]}; do srcs+=("$out/src/$s.cpp"); done
  g++ "${flags[@]}" "$emu/run_$t.cpp" "${srcs[@]}" ${stand_in[$t]:-} "$out/emu.o" \
    "$lib/librf_core.a" "$lib/librf_kernels_avx2.a" "$lib/librf_kernels_avx512.a" "$lib/librf_core.a" -lpthread -o "$out/run_$t"
}
run_one() {
  local t=$1 start=$SECONDS
  if ! build_one "$t" > "$out/$t.log" 2>&1; then echo "cuda-emulate $t: build failed"; tail -20 "$out/$t.log"; return 1; fi
  local rc
  if [ -n "${bench_kind[$t]:-}" ]; then
    timeout 900 "$out/run_$t" --tiny > "$out/$t.json" 2>> "$out/$t.log"
    rc=$?
    python3 "$emu/check_bench.py" "${bench_kind[$t]}" "$out/$t.json" >> "$out/$t.log" 2>&1 || [ $rc -ne 0 ] || rc=1
  else
    timeout 900 "$out/run_$t" >> "$out/$t.log" 2>&1
    rc=$?
  fi
  grep -E '^FAIL|runtime error|^EMU:' "$out/$t.log" | head -20
  echo "cuda-emulate $t: $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out/$t.log" | tail -1 || echo 'no result') (exit $rc, $((SECONDS - start)) s)"
  return $rc
}
# Two at a time (the machine's cores); each test is one process.
failed=0
pids=()
for t in "${tests[@]}"; do
  [ -n "${sources[$t]:-}" ] || { echo "cuda-emulate: unknown test $t" >&2; exit 2; }
  run_one "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || failed=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
passed=0; fails=0
for t in "${tests[@]}"; do
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out/$t.log" | tail -1)
  [ -n "$line" ] || { failed=1; continue; }
  passed=$((passed + ${line%% passed*}))
  f=${line#*, }; fails=$((fails + ${f%% failed}))
done
echo "cuda-emulate: $passed passed, $fails failed"
[ "$failed" = 0 ] && [ "$fails" = 0 ]
