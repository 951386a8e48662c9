#!/usr/bin/env python3
"""Which lines of native/cuda the emulated tests executed (RF_EMU_COVERAGE=1 bash
scripts/cuda-emulate.sh): reads the gcov counts of every object in OBJ_DIR, merges them over the
objects (a header's line counts once it ran from any of them) and prints, per source, the share
of its executable lines that ran, then every kernel (each template instantiation apart) never
launched and every range of lines that never ran, with its first line.
A line no emulated test reaches runs for the first time on a GPU. gcov sees only code that was
compiled: a template never instantiated, or a branch the compiler removed, is not counted.
Usage: coverage.py OBJ_DIR [PREFIX]   (PREFIX: the sources reported, default native/cuda/)
"""
import glob
import json
import os
import subprocess
import sys

obj_dir = sys.argv[1]
prefix = sys.argv[2] if len(sys.argv) > 2 else 'native/cuda/'
ran = {}  # source -> {line: count}
calls = {}  # (source, function as written, template arguments included) -> times called
gcdas = sorted(glob.glob(os.path.join(obj_dir, '*.gcda')))
if not gcdas:
    sys.exit(f'coverage.py: no .gcda files in {obj_dir}: run cuda-emulate.sh with RF_EMU_COVERAGE=1')
for gcda in gcdas:
    o = gcda[:-len('.gcda')] + '.o'
    r = subprocess.run(['gcov', '-j', '-t', '-o', obj_dir, o], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f'coverage.py: gcov failed on {o}: {r.stderr.strip()}')
    for f in json.loads(r.stdout)['files']:
        if not f['file'].startswith(prefix):
            continue
        for fn in f.get('functions', []):
            key = (f['file'], fn['start_line'], fn.get('demangled_name', fn['name']))
            calls[key] = max(calls.get(key, 0), fn['execution_count'])
        lines = ran.setdefault(f['file'], {})
        for ln in f['lines']:
            n = ln['line_number']
            lines[n] = max(lines.get(n, 0), ln['count'])


def source_lines(src):
    return open(src).read().split('\n') if os.path.exists(src) else []


def signature(name):
    """A function's demangled name without its parameters (the first '(' outside <...>)."""
    name = name.replace('(anonymous namespace)::', '').replace('rf::cuda::', '')
    depth = 0
    for i, ch in enumerate(name):
        depth += {'<': 1, '>': -1}.get(ch, 0)
        if ch == '(' and depth == 0:
            return name[:i]
    return name


total_lines = total_ran = 0
report = []
for src in sorted(ran):
    lines = ran[src]
    missed = sorted(n for n, c in lines.items() if c == 0)
    total_lines += len(lines)
    total_ran += len(lines) - len(missed)
    report.append((src, len(lines), len(lines) - len(missed), missed))

print(f'native CUDA lines run under emulation: {total_ran} of {total_lines} ({100 * total_ran / max(total_lines, 1):.1f}%)')
for src, n, r, _ in report:
    print(f'  {src}: {r}/{n} ({100 * r / max(n, 1):.1f}%)')
# A template's instantiations share their lines, so a kernel instantiation that never ran hides
# in the lines of one that did: the kernels are listed apart, by their template arguments.
print('\nkernels never launched (each template instantiation apart):')
texts = {src: source_lines(src) for src in ran}
for (src, line, name), n in sorted(calls.items()):
    head = ' '.join(texts[src][max(0, line - 3):line])  # a kernel's __global__ may sit a line or two above its name
    if n == 0 and '__global__' in head and not name.startswith('_Z') and 'lambda' not in name:
        print(f'  {src}:{line}: {signature(name)}')
print('\nlines never run (first line of each range):')
for src, _, _, missed in report:
    if not missed:
        continue
    lines, text = ran[src], texts[src]
    start = prev = None
    ranges = []
    for n in missed + [None]:
        # Lines with no code between two missed lines: the same range.
        if n is not None and prev is not None and not any(m in lines for m in range(prev + 1, n)):
            prev = n
            continue
        if start is not None:
            ranges.append((start, prev))
        start = prev = n
    for a, b in ranges:
        first = text[a - 1].strip() if a - 1 < len(text) else ''
        span = f'{a}' if a == b else f'{a}-{b}'
        print(f'  {src}:{span}: {first[:100]}')
