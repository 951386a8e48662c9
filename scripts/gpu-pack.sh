#!/usr/bin/env bash
# Packs what the GPU machine lacks for the end-to-end check (it has no Node.js): this machine's
# node binary, the production node_modules (plus node-api-headers, which a plain-CMake build of
# the addon needs) and the compiled dist/, into .gpu-pack/ (git-ignored; name it in the device
# call's `carry`). scripts/gpu-check.sh unpacks it when present.
#   npm run build:ts && bash scripts/gpu-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/index.js ] || { echo "gpu-pack: build dist/ first (npm run build:ts)" >&2; exit 1; }
rm -rf .gpu-pack && mkdir -p .gpu-pack
xz -T2 -6 -c "$(readlink -f "$(command -v node)")" > .gpu-pack/node.xz
mapfile -t modules < <(npm ls --omit=dev --all --parseable 2>/dev/null | tail -n +2 | sed "s|^$PWD/||" | sort -u)
tar -cJf .gpu-pack/modules.tar.xz "${modules[@]}" node_modules/node-api-headers dist
du -sh .gpu-pack/*
