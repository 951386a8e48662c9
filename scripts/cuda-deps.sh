#!/usr/bin/env bash
# Fetches NVIDIA's cuBLASLt (its header and shared library) from Debian's non-free archive into
# DIR (DIR/include/cublasLt.h, cublas_api.h; DIR/lib/libcublasLt.so*), so that a machine whose
# CUDA toolkit has no cuBLAS (CI, the CPU build machines) still compiles the cuBLASLt sources
# against the real header and links the CUDA build against the real library:
#   npm run build:cuda -- --CDRF_CUBLASLT_ROOT=DIR
# Without it those sources compile only against native/cuda/check/cublasLt.h, our own copy of the
# declarations, which cannot tell a misspelt attribute or a wrong signature from a right one.
# Nothing fetched here runs (no GPU): it is a compile and link check; .ci/run uses it when it can.
# Debian's package may hold an older cuBLASLt than the toolkit's (12.4 beside nvcc 13): the API
# redflag uses is the same in both.
# Usage: scripts/cuda-deps.sh DIR   (does nothing when DIR already holds both)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
if [ -f "$dir/include/cublasLt.h" ] && compgen -G "$dir/lib/libcublasLt.so.*" > /dev/null; then
  echo "cuda-deps: $dir already holds cuBLASLt"
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
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite non-free" > "$work/sources.list"
# apt with its own lists and cache: the machine's own sources and state are left alone.
apt=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)"
  -o Acquire::Retries=2 -o Acquire::http::Timeout=60 -qq)
apt-get "${apt[@]}" update
(cd "$work" && apt-get "${apt[@]}" download nvidia-cuda-dev libcublaslt12)
# The two headers only (nvidia-cuda-dev is the whole toolkit's: its cuda_runtime.h must not
# shadow nvcc's own), and the library with its version links.
dpkg-deb --fsys-tarfile "$work"/nvidia-cuda-dev_*.deb | tar -xf - -C "$work/x" ./usr/include/cublasLt.h ./usr/include/cublas_api.h
dpkg-deb -x "$work"/libcublaslt12_*.deb "$work/x"
cp "$work/x/usr/include/cublasLt.h" "$work/x/usr/include/cublas_api.h" "$work/out/include/"
cp -P "$work"/x/usr/lib/x86_64-linux-gnu/libcublasLt.so.* "$work/out/lib/"
soname=$(basename "$(ls "$work"/out/lib/libcublasLt.so.* | sort | head -1)")
ln -s "$soname" "$work/out/lib/libcublasLt.so"
version=$(grep -E '#define CUBLAS_VER_(MAJOR|MINOR|PATCH) ' "$work/out/include/cublas_api.h" | awk '{print $3}' | paste -sd.)
echo "cuBLASLt $version from Debian $suite's non-free archive (scripts/cuda-deps.sh)" > "$work/out/.redflag-cuda-deps"
# Into place in one rename: an interrupted fetch leaves no half-filled DIR behind.
mkdir -p "$(dirname "$dir")"
rm -rf "$dir.partial"
mv "$work/out" "$dir.partial"
rm -rf "$dir"
mv "$dir.partial" "$dir"
echo "cuda-deps: cuBLASLt $version (Debian $suite) in $dir"
