#!/usr/bin/env bash
# Packs what the GPU machine lacks for the end-to-end check and the TypeScript GPU bench (it has
# no Node.js): this machine's node binary, the production node_modules, plus node-api-headers (a
# plain-CMake build of the addon needs them) and tsx with esbuild (npm run bench runs the .ts),
# and the compiled dist/, into .gpu-pack/ (git-ignored; name it in the device call's `carry`);
# with llm.c's sources when a mirror of karpathy/llm.c is here (the fetch tool's, or LLMC_GIT_DIR),
# for the GPU trainer's peer (scripts/llmc-peer.sh). scripts/gpu-check.sh unpacks it when present.
#   npm run build:ts && bash scripts/gpu-pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/index.js ] || { echo "gpu-pack: build dist/ first (npm run build:ts)" >&2; exit 1; }
rm -rf .gpu-pack && mkdir -p .gpu-pack
xz -T2 -6 -c "$(readlink -f "$(command -v node)")" > .gpu-pack/node.xz
mapfile -t modules < <(npm ls --omit=dev --all --parseable 2>/dev/null | tail -n +2 | sed "s|^$PWD/||" | sort -u)
extra=(node_modules/node-api-headers node_modules/tsx node_modules/esbuild)
[ -d node_modules/@esbuild/linux-x64 ] && extra+=(node_modules/@esbuild/linux-x64)
tar -cJf .gpu-pack/modules.tar.xz "${modules[@]}" "${extra[@]}" dist
# llm.c is not part of this repository (bench/peers/llmc.md): only what train_gpt2cu is built from.
llmc_git="${LLMC_GIT_DIR:-/work/.mirror/karpathy+llm.c/repo}"
if [ -d "$llmc_git" ]; then
  tmp=$(mktemp -d)
  git --git-dir="$llmc_git" archive HEAD LICENSE train_gpt2.cu llmc | tar -x -C "$tmp"
  git --git-dir="$llmc_git" rev-parse HEAD > "$tmp/COMMIT"
  tar -cJf .gpu-pack/llmc.tar.xz -C "$tmp" .
  rm -rf "$tmp"
else
  echo "gpu-pack: no llm.c mirror at $llmc_git: the llm.c peer will be skipped" >&2
fi
du -sh .gpu-pack/*
