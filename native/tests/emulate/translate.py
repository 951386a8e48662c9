#!/usr/bin/env python3
"""Rewrites a .cu source for the CPU emulation (see emu.cpp): each kernel launch
`name<<<grid, block[, smem[, stream]]>>>(args);` becomes
`emu_launch(dim3(grid), dim3(block), smem, [=] { name(args); });`, and the dynamic shared-memory
declaration points at the emulation's buffer.  Usage: translate.py IN.cu OUT.cpp
"""
import re
import sys


def split_top(s):
    """Splits a launch configuration at its top-level commas."""
    out, depth, cur = [], 0, ''
    for ch in s:
        if ch in '([{':
            depth += 1
        if ch in ')]}':
            depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur)
            cur = ''
        else:
            cur += ch
    out.append(cur)
    return [x.strip() for x in out]


def launch(m):
    name, cfg, args = m.group(1), m.group(2), m.group(3)
    c = split_top(cfg)
    smem = c[2] if len(c) > 2 else '0'
    return 'emu_launch(dim3(%s), dim3(%s), %s, [=] { %s(%s); });' % (c[0], c[1], smem, name, args)


src = open(sys.argv[1]).read()
src = re.sub(r'extern __shared__ __align__\(16\) unsigned char (\w+)\[\];', r'unsigned char* \1 = emu_smem;', src)
src = re.sub(r'(\w+(?:<[\w, ]+>)?)<<<(.+?)>>>\((.*?)\);', launch, src, flags=re.S)
if '<<<' in src:
    sys.exit(f"translate.py: a kernel launch in {sys.argv[1]} was not rewritten: {src[src.index('<<<') - 60:src.index('<<<') + 40]!r}")
open(sys.argv[2], 'w').write(src)
