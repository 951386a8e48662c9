#!/usr/bin/env bash
# Fetches NVIDIA's cuBLASLt (header and shared library) and NCCL's header from Debian's non-free
# and contrib archives into DIR (DIR/include/cublasLt.h, cublas_api.h, nccl.h;
# DIR/lib/libcublasLt.so*), so that a machine whose CUDA toolkit has neither (CI, the CPU build
# machines) still compiles the cuBLASLt sources and the data-parallel collective
# (native/cuda/collective.cu) against the real headers and links the CUDA build against the real
# cuBLASLt:
#   npm run build:cuda -- --CDRF_CUBLASLT_ROOT=DIR --CDRF_NCCL_ROOT=DIR
# Without it those sources compile only against native/cuda/check/, our own copies of the
# declarations, which cannot tell a misspelt attribute or a wrong signature from a right one.
# NCCL's library is not fetched: Debian's needs a newer C library (glibc 2.38) than bookworm's, and
# an addon linked with it would not load there. With the header alone, CMake compiles
# collective.cu against it and links it into nothing (RF_NCCL_ROOT without lib/).
# Nothing fetched here runs (no GPU): it is a compile and link check; .ci/run uses it when it can.
# Debian's packages may be older than the toolkit (cuBLASLt 12.4, NCCL 2.22 beside nvcc 13): the
# API redflag uses is the same in both.
# Usage: scripts/cuda-deps.sh DIR   (does nothing when DIR already holds all of it)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
if [ -f "$dir/include/cublasLt.h" ] && compgen -G "$dir/lib/libcublasLt.so.*" > /dev/null &&
   [ -f "$dir/include/nccl.h" ]; then
  echo "cuda-deps: $dir already holds cuBLASLt and NCCL's header"
  exit 0
fi
# Only a folder this script made (its marker inside) is replaced: never a user's own.
if [ -e "$dir" ] && [ ! -f "$dir/.redflag-cuda-deps" ] && [ -n "$(ls -A "$dir" 2>/dev/null || echo file)" ]; then
  echo "cuda-deps: $dir exists and is not a folder this script made: name a new one" >&2
  exit 2
fi
suite=${RF_CUDA_DEPS_SUITE:-trixie}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/out/include" "$work/out/lib" "$work/x"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite non-free contrib" > "$work/sources.list"
# apt with its own lists and cache: the machine's own sources and state are left alone.
apt=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)"
  -o Acquire::Retries=2 -o Acquire::http::Timeout=60 -qq)
apt-get "${apt[@]}" update
(cd "$work" && apt-get "${apt[@]}" download nvidia-cuda-dev libcublaslt12 libnccl-dev)
# cuBLASLt's two headers only (nvidia-cuda-dev is the whole toolkit's: its cuda_runtime.h must not
# shadow nvcc's own) and NCCL's one, and cuBLASLt's library with its version links.
dpkg-deb --fsys-tarfile "$work"/nvidia-cuda-dev_*.deb | tar -xf - -C "$work/x" ./usr/include/cublasLt.h ./usr/include/cublas_api.h
dpkg-deb --fsys-tarfile "$work"/libnccl-dev_*.deb | tar -xf - -C "$work/x" ./usr/include/nccl.h
dpkg-deb -x "$work"/libcublaslt12_*.deb "$work/x"
cp "$work/x/usr/include/cublasLt.h" "$work/x/usr/include/cublas_api.h" "$work/x/usr/include/nccl.h" "$work/out/include/"
cp -P "$work"/x/usr/lib/x86_64-linux-gnu/libcublasLt.so.* "$work/out/lib/"
soname=$(basename "$(ls "$work"/out/lib/libcublasLt.so.* | sort | head -1)")
ln -s "$soname" "$work/out/lib/libcublasLt.so"
version=$(grep -E '#define CUBLAS_VER_(MAJOR|MINOR|PATCH) ' "$work/out/include/cublas_api.h" | awk '{print $3}' | paste -sd.)
nccl=$(grep -E '#define NCCL_(MAJOR|MINOR|PATCH) ' "$work/out/include/nccl.h" | awk '{print $3}' | paste -sd.)
echo "cuBLASLt $version and NCCL $nccl's header from Debian $suite's non-free and contrib archives (scripts/cuda-deps.sh)" > "$work/out/.redflag-cuda-deps"
# Into place in one rename: an interrupted fetch leaves no half-filled DIR behind.
mkdir -p "$(dirname "$dir")"
rm -rf "$dir.partial"
mv "$work/out" "$dir.partial"
rm -rf "$dir"
mv "$dir.partial" "$dir"
echo "cuda-deps: cuBLASLt $version and NCCL $nccl's header (Debian $suite) in $dir"
