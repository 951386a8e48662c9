#!/usr/bin/env bash
# Runs the CUDA tests on the CPU under the emulation in native/tests/emulate (no GPU, no nvcc: g++
# and python3), so every CI run executes the kernels' and the CUDA engine's logic against the CPU
# references, as a GPU machine does with the real thing (scripts/gpu-check.sh). cuBLASLt is
# emulated from its documented semantics (native/tests/emulate/cublaslt.cpp), so cuda/gemm.cu runs
# too; see native/tests/emulate/emu.cpp for what emulation cannot catch.
# Needs the CPU libraries of build-native (npm run test:native builds them first, then calls this),
# and for the end-to-end tests the CPU addon's build/ and dist/ (npm ci makes both).
#   bash scripts/cuda-emulate.sh [TEST...]     (default: all; names as in native/tests/emulate/run_*.cpp,
#                                               and e2e, train_e2e, eval_e2e, serve; attention_sm86 and
#                                               attention_backward_sm86 on an emulated 8.6 GPU)
set -uo pipefail
# The script is one compound command, which bash reads whole before running it (and which exits
# within): a run takes minutes, and bash otherwise reads a script as it goes, so an edit made
# meanwhile would change what the running copy does next.
{
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
# the test with its line (see emu.cpp). Position-independent, so that the tests and the emulated
# addon link the same objects: each source is compiled once.
flags=(-std=c++17 -O2 -w -fsanitize=alignment -fno-sanitize-recover=alignment -fPIC -pthread -I"$emu" -I"$out/include" -Inative)
link=(-pthread -fsanitize=alignment)
# RF_EMU_COVERAGE=1: which lines of native/cuda the run executed (coverage.py, after the tests):
# a line that no emulated test reaches runs for the first time on a GPU. Counted in native/cuda's
# objects only, at -O0 (so that lines and template instances keep their own counts), without
# atomic updates (each test's kernels run on one thread at a time), which would make the
# emulation many times slower.
coverage=${RF_EMU_COVERAGE:-0}
[ "$coverage" = 1 ] && link+=(--coverage)
# The device sources each test needs (translated), besides smoke.cu's device_info (the emulation's
# one device) and the emulated runtime.
declare -A sources=(
  [emulator]="emulator_test"
  [smoke]="smoke"
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
# Tests run again on the emulated device as another GPU (RF_EMU_DEVICE): the attention kernels,
# whose shared memory is the largest, on an 8.6 GPU (A10, RTX 30xx), which opts in to 99 KiB a
# block (227 KiB on 9.0), and where launches are ordinary (no dependent launches before 9.0).
declare -A base_of=([attention_sm86]=attention [attention_backward_sm86]=attention_backward)
declare -A device_of=([attention_sm86]=8.6 [attention_backward_sm86]=8.6)
base() { echo "${base_of[$1]:-$1}"; }
declare -A stand_in=([emulator]=cublaslt [gemm]=cublaslt [rf_loss]=cublaslt [model]=cublaslt [train]=cublaslt [bench]=cublaslt
  [train_bench]=cublaslt)
# The benchmarks print one JSON object, which check_json.py checks and tallies.
declare -A bench_kind=([bench]=cuda [train_bench]=cuda-train)
# The library end to end on the emulated GPU, in Node, on an addon built from the emulated CUDA
# sources (all of native/cuda, the N-API layer with RF_HAVE_CUDA) and the CPU addon's objects
# (link_addon): the GPU machine's end-to-end scripts with --device cuda against the CPU engine,
# and its server bench (npm run bench -- gpu-serve) on a tiny model in bf16; check_json.py
# checks what each printed.
declare -A e2e_script=([e2e]="scripts/device-e2e.mjs --device cuda" [train_e2e]="scripts/device-train-e2e.mjs --device cuda"
  [eval_e2e]="scripts/device-eval-e2e.mjs --device cuda" [serve]="--import tsx bench/run.ts gpu-serve --tiny")
declare -A e2e_kind=([e2e]=e2e [train_e2e]=e2e [eval_e2e]=e2e [serve]=gpu-serve)
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=(e2e train_e2e eval_e2e serve emulator smoke ops ops_backward optim attention attention_backward attention_sm86 attention_backward_sm86 rf_loss model_ops gemv gemm train_ops model train bench train_bench)
addon=0
for t in "${tests[@]}"; do
  b=$(base "$t")
  [ -n "${sources[$b]:-}" ] || [ -n "${e2e_script[$t]:-}" ] || { echo "cuda-emulate: unknown test $t" >&2; exit 2; }
  [ -n "${e2e_script[$t]:-}" ] && addon=1
done
# The addon's CPU engine comes from the CPU addon's node-gyp build (npm ci), which also names
# Node's headers.
gyp=build/Release
gyp_obj=build/Release/obj.target/redflag/native
napi_flags=()
if [ "$addon" = 1 ]; then
  for f in "$gyp/rf_kernels_avx2.a" "$gyp/rf_kernels_avx512.a" "$gyp_obj/model/cpu_engine.o" build/config.gypi dist/index.js; do
    [ -f "$f" ] || { echo "cuda-emulate: $f is missing: build the CPU addon and the TypeScript first (npm ci)" >&2; exit 1; }
  done
  nodedir=$(sed -n 's/^ *"nodedir": "\(.*\)",*$/\1/p' build/config.gypi)
  napi=$(node -p "require('node-addon-api').include_dir") || exit 1
  napi_flags=(-fexceptions -I"$nodedir/include/node" -I"$napi" -DNAPI_VERSION=8 -DNODE_ADDON_API_DISABLE_DEPRECATED
    -DNODE_ADDON_API_CPP_EXCEPTIONS -DRF_HAVE_CUDA=1 -DRF_HAVE_CUBLASLT=1)
fi
# Every object the requested tests need, each compiled once into $obj, two compilers at a time:
# the translated sources, the emulated runtime and cuBLASLt, each test's run_*.cpp, and for the
# addon all of native/cuda and native/napi.
obj=$out/obj
rm -rf "$obj" && mkdir -p "$obj"
declare -A want=([smoke]=1 [emu]=1)
for t in "${tests[@]}"; do
  b=$(base "$t")
  for s in ${sources[$b]:-} ${stand_in[$b]:-}; do want[$s]=1; done
  [ -f "$emu/run_$b.cpp" ] && want[run_$b]=1
done
if [ "$addon" = 1 ]; then
  want[cublaslt]=1
  for f in native/cuda/*.cu; do want[$(basename "$f" .cu)]=1; done
  for f in native/napi/*.cpp; do want[napi_$(basename "$f" .cpp)]=1; done
fi
source_of() {  # an object's name: its source
  case "$1" in
    emu | cublaslt | run_*) echo "$emu/$1.cpp" ;;
    napi_*) echo "native/napi/${1#napi_}.cpp" ;;
    *) echo "$out/src/$1.cpp" ;;
  esac
}
start=$SECONDS
running=0 compile_failed=0
for o in "${!want[@]}"; do
  extra=()
  [[ $o == napi_* ]] && extra=("${napi_flags[@]}")
  [ "$coverage" = 1 ] && [ -f "native/cuda/$o.cu" ] && extra=(--coverage -fprofile-update=single -O0)
  g++ "${flags[@]}" "${extra[@]}" -c "$(source_of "$o")" -o "$obj/$o.o" > "$obj/$o.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge 2 ]; then wait -n || compile_failed=1; running=$((running - 1)); fi
done
while [ "$running" -gt 0 ]; do wait -n || compile_failed=1; running=$((running - 1)); done
if [ "$compile_failed" = 1 ]; then
  for o in "${!want[@]}"; do [ -f "$obj/$o.o" ] || { echo "cuda-emulate: $(source_of "$o") did not compile"; tail -20 "$obj/$o.log"; }; done
  exit 1
fi
echo "cuda-emulate: compiled ${#want[@]} sources ($((SECONDS - start)) s)"
cpu_libs=("$lib/librf_core.a" "$lib/librf_kernels_avx2.a" "$lib/librf_kernels_avx512.a" "$lib/librf_core.a")
# A test's program: its run_*.cpp (the benchmarks have their own main) and its objects.
link_one() {
  local t=$1 b objs=()
  b=$(base "$t")
  [ -f "$emu/run_$b.cpp" ] && objs+=("$obj/run_$b.o")
  for s in $(printf '%s\n' ${sources[$b]} ${stand_in[$b]:-} smoke emu | sort -u); do objs+=("$obj/$s.o"); done
  g++ "${link[@]}" "${objs[@]}" "${cpu_libs[@]}" -o "$out/run_$t"
}
# The emulated addon, $out/redflag_emu.node: the emulated CUDA engine and N-API layer, and the CPU
# engine's objects from the CPU addon's build.
link_addon() {
  local objs=()
  for f in native/cuda/*.cu; do objs+=("$obj/$(basename "$f" .cu).o"); done
  for f in native/napi/*.cpp; do objs+=("$obj/napi_$(basename "$f" .cpp).o"); done
  g++ -shared "${link[@]}" -o "$out/redflag_emu.node" "${objs[@]}" "$obj/emu.o" "$obj/cublaslt.o" "$gyp_obj"/{core,dispatch,model}/*.o \
    "$gyp/rf_kernels_avx2.a" "$gyp/rf_kernels_avx512.a"
}
run_one() {
  local t=$1 start=$SECONDS rc
  if [ -n "${e2e_script[$t]:-}" ]; then
    : > "$out/$t.log"
    # shellcheck disable=SC2086  # the script and its arguments
    REDFLAG_ADDON="$PWD/$out/redflag_emu.node" timeout 1800 node ${e2e_script[$t]} > "$out/$t.json" 2>> "$out/$t.log"
    rc=$?
    python3 "$emu/check_json.py" "${e2e_kind[$t]}" "$out/$t.json" >> "$out/$t.log" 2>&1 || [ $rc -ne 0 ] || rc=1
    grep -E '^FAIL|runtime error|^EMU:' "$out/$t.log" | head -20
    echo "cuda-emulate $t: $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out/$t.log" | tail -1 || echo 'no result') (exit $rc, $((SECONDS - start)) s)"
    return $rc
  fi
  if ! link_one "$t" > "$out/$t.log" 2>&1; then echo "cuda-emulate $t: link failed"; tail -20 "$out/$t.log"; return 1; fi
  if [ -n "${bench_kind[$t]:-}" ]; then
    timeout 900 "$out/run_$t" --tiny > "$out/$t.json" 2>> "$out/$t.log"
    rc=$?
    python3 "$emu/check_json.py" "${bench_kind[$t]}" "$out/$t.json" >> "$out/$t.log" 2>&1 || [ $rc -ne 0 ] || rc=1
  else
    RF_EMU_DEVICE=${device_of[$t]:-${RF_EMU_DEVICE:-}} timeout 900 "$out/run_$t" >> "$out/$t.log" 2>&1
    rc=$?
  fi
  grep -E '^FAIL|runtime error|^EMU:' "$out/$t.log" | head -20
  echo "cuda-emulate $t: $(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out/$t.log" | tail -1 || echo 'no result') (exit $rc, $((SECONDS - start)) s)"
  return $rc
}
# The addon first, when an end-to-end test runs (the two share it).
if [ "$addon" = 1 ]; then
  link_addon > "$out/addon.log" 2>&1 || { echo "cuda-emulate: the emulated addon did not link"; tail -20 "$out/addon.log"; exit 1; }
fi
# Two at a time (the machine's cores); each test is one process.
failed=0
pids=()
for t in "${tests[@]}"; do
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
if [ "$coverage" = 1 ]; then
  python3 "$emu/coverage.py" "$obj" > "$out/coverage.txt" && sed -n '1,/^$/p' "$out/coverage.txt"
  echo "cuda-emulate: the lines never run are listed in $out/coverage.txt"
fi
[ "$failed" = 0 ] && [ "$fails" = 0 ]
exit  # inside the braces: nothing after them is read
}
