#!/usr/bin/env bash
# llm.c's CUDA trainer (train_gpt2cu) as the peer of `cuda_train_bench --only=full` on the GPU
# machine (bench/peers/llmc.md): unpacks the llm.c sources that scripts/gpu-pack.sh carried
# (.gpu-pack/llmc.tar.xz), builds train_gpt2cu the way its Makefile does (bf16, no cuDNN, one
# GPU) against the toolkit's cuBLAS or the pip wheel's, writes random token files in its data
# format, trains a randomly initialised GPT-2 124M (`-e d12`) at B x T = 64 x 1024 for a few steps
# and prints JSON: llm.c's commit, every step's ms and the median of steps 2..N.
#   bash scripts/llmc-peer.sh LOG_DIR > llmc.json
set -uo pipefail
logs="${1:?usage: scripts/llmc-peer.sh LOG_DIR}"
mkdir -p "$logs"
cd "$(dirname "$0")/.."
pack="$PWD/.gpu-pack/llmc.tar.xz"
fail() { printf '{"error": "%s"}\n' "$1"; exit 1; }
[ -f "$pack" ] || fail "no .gpu-pack/llmc.tar.xz (scripts/gpu-pack.sh packs it when the llm.c mirror is present)"
src=$(mktemp -d /tmp/llmc.XXXXXX)
tar -xJf "$pack" -C "$src" || fail "cannot unpack $pack"
commit=$(cat "$src/COMMIT" 2>/dev/null || echo unknown)
cd "$src"

# cuBLAS: the toolkit's when nvcc finds cublas_v2.h by itself, else the pip wheel's folder
# (nvidia/cu13 for CUDA 13 wheels, nvidia/cublas for CUDA 12's), as CMakeLists.txt looks for it.
blas=()
command -v nvcc > /dev/null || fail "no nvcc on PATH"
printf '#include <cublas_v2.h>\nint main() { return 0; }\n' > probe.cu
if ! nvcc probe.cu -o probe > /dev/null 2>&1; then
  root=$(python3 - <<'EOF'
import glob, os, site
for base in site.getsitepackages():
    for sub in ['cu13', 'cublas', 'cu12']:
        d = os.path.join(base, 'nvidia', sub)
        if os.path.isfile(os.path.join(d, 'include', 'cublas_v2.h')) and glob.glob(os.path.join(d, 'lib', 'libcublas.so*')):
            print(d); raise SystemExit
EOF
)
  [ -n "$root" ] || fail "no cuBLAS: neither the toolkit's nor a pip wheel's"
  # the wheel ships only versioned libraries: link through unversioned names in a scratch folder
  mkdir -p "$src/lib"
  for l in cublas cublasLt; do ln -sf "$(ls "$root"/lib/lib$l.so.* | head -1)" "$src/lib/lib$l.so"; done
  blas=(-I"$root/include" -L"$src/lib" -Xlinker -rpath="$root/lib")
fi
# The Makefile's flags for train_gpt2cu (PRECISION=BF16, USE_CUDNN=0, NO_MULTI_GPU=1), for sm_90.
flags=(--threads=0 -t=0 --use_fast_math -std=c++17 -O3 -DENABLE_BF16
       --generate-code "arch=compute_90,code=[compute_90,sm_90]")
# llmc/mfu.h uses NVML (GPU clock readings in its log, not part of the step) when nvml.h is found:
# then link the driver's libnvidia-ml.so.1 through an unversioned name.
nvml=()
printf '#include <nvml.h>\nint main() { return 0; }\n' > nvml_probe.cu
if nvcc nvml_probe.cu -o nvml_probe > /dev/null 2>&1; then
  for f in $(ldconfig -p 2>/dev/null | awk '/libnvidia-ml.so.1 /{print $NF}') /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 \
           /usr/lib64/libnvidia-ml.so.1 /usr/local/nvidia/lib64/libnvidia-ml.so.1; do
    if [ -e "$f" ]; then ln -sf "$f" "$src/libnvidia-ml.so"; break; fi
  done
  nvml=(-L"$src" -lnvidia-ml)
fi
if ! nvcc "${flags[@]}" train_gpt2.cu "${blas[@]}" -lcublas -lcublasLt "${nvml[@]}" -o train_gpt2cu > "$logs/llmc-build.log" 2>&1; then
  tail -20 "$logs/llmc-build.log" >&2
  fail "train_gpt2cu did not build (llmc-build.log)"
fi

# Random token ids in llm.c's data format (llmc/dataloader.h: 256 int32 header [20240520, 1,
# ntok], then ntok uint16), enough for the steps below without wrapping.
python3 - <<'EOF' || fail "cannot write the token files"
import numpy as np, os
rng = np.random.default_rng(0)
os.makedirs('data', exist_ok=True)
for name, n in [('train', 16 << 20), ('val', 1 << 20)]:
    h = np.zeros(256, np.int32); h[:3] = [20240520, 1, n]
    with open(f'data/rand_{name}.bin', 'wb') as f:
        f.write(h.tobytes()); f.write(rng.integers(0, 50257, n, dtype=np.uint16).tobytes())
EOF
steps=${LLMC_STEPS:-12}
# -e d12: GPT-2 124M from its own random init; -v above the step count and -m 1: one validation
# batch, outside the timed steps; -s 0: no sampling; its defaults otherwise (recompute 1, ZeRO 0).
timeout 300 ./train_gpt2cu -e d12 -b 64 -t 1024 -x "$steps" -v 100000 -m 1 -s 0 -h 0 \
  -i data/rand_train.bin -j data/rand_val.bin > "$logs/llmc-run.log" 2>&1
rc=$?
python3 - "$logs/llmc-run.log" "$commit" "$rc" <<'EOF'
import json, re, statistics, sys
log, commit, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
ms = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r'^step\s+(\d+)/\d+ \|.*\| ([0-9.]+) ms \|', open(log).read(), re.M)}
timed = [ms[s] for s in sorted(ms) if s >= 2]  # step 1 is the warm-up (first allocations, autotuning)
out = {'peer': 'llm.c train_gpt2cu', 'commit': commit, 'exit': rc, 'batch': 64, 'tokens': 1024, 'msPerStep': ms}
if timed:
    med = statistics.median(timed)
    out.update(medianMsSteps2on=med, tokensPerSecond=64 * 1024 / (med / 1000))
print(json.dumps(out))
sys.exit(0 if rc == 0 and timed else 1)
EOF
