#!/usr/bin/env python3
"""Rewrites a .cu source for the CPU emulation (see emu.cpp):
- each kernel launch `name<<<grid, block[, smem[, stream]]>>>(args);` becomes
  `emu_launch(dim3(grid), dim3(block), smem, {"name", key, bounds}, [=, emu_args = tuple(args)]
  { name(emu_args...); });` (the arguments evaluated at the launch, as on a GPU), and each
  `launch_dependent(name, grid, block, smem, stream, args...);` (cuda/launch.cuh) the same, marked
  dependent (every thread must call grid_dependency_wait), where
  key identifies the kernel for its shared-memory attribute (cudaFuncSetAttribute) and bounds is
  its __launch_bounds__ when this file defines it (0: none known), so that the emulation refuses a
  launch a GPU would refuse;
- the dynamic shared-memory declaration points at the emulation's buffer;
- each static __shared__ declaration is followed by a call that poisons it once per block, as the
  dynamic buffer is, so that a read before any write shows up.
Usage: translate.py IN.cu OUT.cpp
"""
import re
import sys


def split_top(s):
    """Splits a launch configuration or declarator list at its top-level commas."""
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


src = open(sys.argv[1]).read()
lines = src.count('\n')

# The launch bounds of the kernels defined here, and the kernels given a shared-memory attribute.
# (The first argument: the most threads a block may have; the second, blocks per SM, is a hint.)
bounds = dict((m.group(2), split_top(m.group(1))[0])
              for m in re.finditer(r'__global__\s+void\s+__launch_bounds__\(((?:[^()]|\([^()]*\))*)\)\s*(\w+)', src))
attributed = set(re.findall(r'cudaFuncSetAttribute\(\s*([\w]+(?:<[\w, ]+>)?)\s*,', src))


def emu_launch(name, c, args, dependent):
    base = name.split('<')[0]
    smem = c[2] if len(c) > 2 else '0'
    # Only a kernel given the attribute needs a key (the address of the same name, so the same
    # instantiation); the others keep the default 48 KiB limit, as on a GPU.
    key = '(const void*)&%s' % name if name in attributed else 'nullptr'
    bound = 'int(%s)' % bounds[base] if base in bounds else '0'
    # The arguments are evaluated at the launch, as a GPU evaluates them (a captured graph keeps
    # their values), not when the emulation runs the kernel, which may be at a graph's replay.
    return ('emu_launch(dim3(%s), dim3(%s), %s, EmuKernel{"%s", %s, %s, %s}, [=, emu_args = std::make_tuple(%s)] '
            '{ std::apply([](const auto&... a) { %s(a...); }, emu_args); });') % (
                c[0], c[1], smem, base, key, bound, 'true' if dependent else 'false', args, name)


def keep_lines(new, old):
    """new, followed by the line breaks of old that it lacks (the arguments keep theirs)."""
    return new + '\n' * (old.count('\n') - new.count('\n'))


def launch(m):
    # The launch's line breaks kept after it, so every later line keeps its number (#line below).
    return keep_lines(emu_launch(m.group(1), split_top(m.group(2)), m.group(3), False), m.group(0))


def dependent_launches(src):
    """Rewrites each `launch_dependent(name, grid, block, smem, stream, args...);` call."""
    out, at = '', 0
    for m in re.finditer(r'(?<![\w:])(?:\w+::)*launch_dependent\(', src):
        if m.start() < at:
            continue
        depth, i = 1, m.end()
        while depth:
            depth += {'(': 1, ')': -1}.get(src[i], 0)
            i += 1
        # The kernel's name (a template's commas are not split_top's), then the launch's four
        # settings and the arguments.
        name = re.match(r'\s*(\w+(?:<[\w, ]+>)?)\s*,', src[m.end():i - 1])
        parts = split_top(src[m.end() + name.end():i - 1]) if name else []
        if len(parts) < 4:
            continue  # the template's own definition
        if src[i] != ';':
            sys.exit(f"translate.py: a launch_dependent call in {sys.argv[1]} is not a statement: {src[m.start():i + 20]!r}")
        out += src[at:m.start()] + keep_lines(emu_launch(name.group(1), parts[:4], ', '.join(parts[4:]), True), src[m.start():i])
        at = i + 1
    return out + src[at:]


def poison_shared(m):
    decl = m.group(0)
    names = [re.match(r'\w+', d).group(0) for d in split_top(m.group(2))]
    return decl + ''.join(' emu_poison_shared(&%s, sizeof(%s));' % (n, n) for n in names)


src = re.sub(r'extern __shared__ __align__\(16\) unsigned char (\w+)\[\];', r'unsigned char* \1 = emu_smem;', src)
src = re.sub(r'(?<!extern )(?:__align__\(\d+\)\s+)?__shared__\s+([\w:]+)\s+([^;]+);', poison_shared, src)
src = re.sub(r'(\w+(?:<[\w, ]+>)?)<<<(.+?)>>>\((.*?)\);', launch, src, flags=re.S)
src = dependent_launches(src)
if '<<<' in src:
    sys.exit(f"translate.py: a kernel launch in {sys.argv[1]} was not rewritten: {src[src.index('<<<') - 60:src.index('<<<') + 40]!r}")
# Every line keeps its number and the directive names the original, so a compiler message, a
# CUDA_CHECK's __FILE__:__LINE__ and the coverage report (cuda-emulate.sh) point into the .cu source.
if src.count('\n') != lines:
    sys.exit(f"translate.py: {sys.argv[1]}: the rewrite changed the number of lines")
open(sys.argv[2], 'w').write('#line 1 "%s"\n' % sys.argv[1] + src)
