#!/usr/bin/env python3
"""Checks what a GPU benchmark printed under the CPU emulation (cuda_bench / cuda_train_bench
--tiny, scripts/cuda-emulate.sh): one strict JSON object (no nan or inf: printf writes them bare,
which no JSON parser takes), every number finite, every time and rate above zero (and a profiled
step's phases), and the parts that gpu-check.sh and the closing notes read, each present and
without an error. The figures themselves mean nothing under emulation. Prints the emulated
tests' tally line.

    check_bench.py cuda|cuda-train FILE.json
"""
import json
import math
import sys

REQUIRED = {
    # per model of cuda_bench
    "cuda": ["decode", "prefill", "prefillAttention", "gemvAlone", "decodeAttentionAlone", "pickEpilogue", "adapterDecode"],
    "cuda-train": ["train", "attention", "full", "loss"],
}


def numbers(v, path):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from numbers(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from numbers(x, f"{path}[{i}]")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield path, v


def problems(kind, text):
    def reject(token):
        raise ValueError(f"non-finite number {token}")
    try:
        doc = json.loads(text, parse_constant=reject)
    except ValueError as e:
        return [f"not one JSON object: {e}"]
    out = []
    if doc.get("bench") != kind:
        out.append(f'"bench" is {doc.get("bench")!r}, not {kind!r}')
    if "skipped" in doc:
        out.append(f'skipped: {doc["skipped"]}')
    parts = doc.get("models", []) if kind == "cuda" else [doc]
    if kind == "cuda" and len(parts) != 2:
        out.append(f"{len(parts)} models, not 2")
    for part in parts:
        for key in REQUIRED[kind]:
            if key not in part:
                out.append(f"{part.get('model', kind)}: no {key!r}" + (f" ({part[key + 'Error']})" if key + "Error" in part else ""))
    out += [f"{p} = {v}" for p, v in numbers(doc, "") if not math.isfinite(v)]
    # Every time and rate measured, and each profiled step's phases together, above zero.
    for p, v in numbers(doc, ""):
        key = p.rsplit(".", 1)[-1]
        if ".phaseSeconds." not in p and (key.lower().endswith("seconds") or key.endswith("PerSecond")) and not v > 0:
            out.append(f"{p} = {v}, not above zero")
    for i, step in enumerate(doc.get("train", [])):
        if not sum(step.get("phaseSeconds", {}).values()) > 0:
            out.append(f"train[{i}].phaseSeconds: no phase has time")
    return out


def main():
    kind, path = sys.argv[1], sys.argv[2]
    found = problems(kind, open(path).read())
    for p in found:
        print(f"FAIL {path}: {p}")
    print(f"{0 if found else 1} passed, {1 if found else 0} failed")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
