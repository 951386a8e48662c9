#!/usr/bin/env python3
"""Checks what a GPU benchmark or an end-to-end script printed under the CPU emulation of CUDA
(scripts/cuda-emulate.sh) and prints the emulated tests' tally line.

cuda, cuda-train: cuda_bench / cuda_train_bench --tiny. One strict JSON object (no nan or inf:
printf writes them bare, which no JSON parser takes), every number finite, every time and rate
above zero (and a profiled step's phases), and the parts that gpu-check.sh and the closing notes
read, each present and without an error. The figures themselves mean nothing under emulation.

gpu-serve: npm run bench -- gpu-serve --tiny (the server over HTTP on the emulated GPU): the
same, with its streams and classify parts.

e2e: scripts/device-e2e.mjs, device-train-e2e.mjs or device-eval-e2e.mjs --device cuda (their own checks, one per
line of the tally; a failed one printed with its details).

    check_json.py cuda|cuda-train|gpu-serve|e2e FILE.json
"""
import json
import math
import sys

REQUIRED = {
    # per model of cuda_bench
    "cuda": ["decode", "prefill", "prefillAttention", "gemvAlone", "decodeAttentionAlone", "pickEpilogue", "adapterDecode"],
    "cuda-train": ["train", "attention", "full", "loss"],
    "gpu-serve": ["streams", "classify"],
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
    if not isinstance(doc, dict):
        return ["not one JSON object"]
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
    if kind == "gpu-serve":  # every stream count answered, each with its first token
        for i, st in enumerate(doc.get("streams", [])):
            if not (st.get("completionTokens", 0) > 0 and st.get("ttftMsMedian", 0) > 0):
                out.append(f"streams[{i}]: no tokens or no time to the first")
        if len(doc.get("streams", [])) != 2:
            out.append(f"{len(doc.get('streams', []))} stream counts, not 2")
        compared = doc.get("overlapCompared") or {}
        if not (compared.get("completionTokens", 0) > 0 and compared.get("overlapSteps") is False):
            out.append("overlapCompared: no run with overlapped steps off")
    for i, step in enumerate(doc.get("train", [])):
        if not sum(step.get("phaseSeconds", {}).values()) > 0:
            out.append(f"train[{i}].phaseSeconds: no phase has time")
    return out


def e2e(path):
    try:
        doc = json.load(open(path))
        checks = doc["checks"]
    except (ValueError, KeyError) as e:
        print(f"FAIL {path}: not the end-to-end script's JSON ({e})")
        print("0 passed, 1 failed")
        return 1
    failed = [c for c in checks if not c.get("ok")]
    for c in failed:
        detail = {k: v for k, v in c.items() if k not in ("ok", "what")}
        print(f"FAIL {c.get('what')}: {json.dumps(detail)[:2000]}")
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not checks else 0


def main():
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "e2e":
        return e2e(path)
    try:
        text = open(path).read()
    except OSError:
        text = ""
    found = problems(kind, text)
    for p in found:
        print(f"FAIL {path}: {p}")
    print(f"{0 if found else 1} passed, {1 if found else 0} failed")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
