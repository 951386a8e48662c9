// scripts/gpu-check.sh, the one call a GPU session makes, run here on stand-ins for what it builds
// (RF_GPU_CHECK_BUILD=0: shell scripts in place of the CUDA tests and bench), so a mistake in its
// bookkeeping shows before a lease is spent on it: the summary is JSON, a test that saw no GPU is
// -3 (not a pass) and the summary says `gpu: none`, a failing test runs again with dependent
// launches off, a stage is cut at the deadline and the stages after it are -2, and the logs come
// back packed. The script runs from a copy of itself in a temporary folder, so nothing it unpacks
// or writes can touch this checkout.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const SCRIPT = join(import.meta.dirname, '..', 'scripts', 'gpu-check.sh');
let root: string;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'redflag-gpu-check-'));
  await mkdir(join(root, 'scripts'));
  await copyFile(SCRIPT, join(root, 'scripts', 'gpu-check.sh'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A build folder of stand-ins: name -> the body of a bash script. */
async function standIns(name: string, programs: Record<string, string>): Promise<string> {
  const dir = join(root, name);
  await mkdir(dir);
  for (const [program, body] of Object.entries(programs)) {
    await writeFile(join(dir, program), `#!/usr/bin/env bash\n${body}\n`);
    await chmod(join(dir, program), 0o755);
  }
  return dir;
}

async function gpuCheck(build: string, env: Record<string, string>): Promise<{ summary: Record<string, unknown>; out: string; stdout: string }> {
  const out = join(root, `out-${Math.random().toString(36).slice(2)}`);
  const { stdout } = await promisify(execFile)('bash', [join(root, 'scripts', 'gpu-check.sh'), out], {
    env: { ...process.env, RF_GPU_CHECK_BUILD: '0', RF_GPU_CHECK_BUILD_DIR: build, ...env },
    timeout: 120_000,
  });
  return { summary: JSON.parse(await readFile(join(out, 'summary.json'), 'utf8')) as Record<string, unknown>, out, stdout };
}

describe('scripts/gpu-check.sh', () => {
  it('on a machine that shows no GPU: every CUDA test and the bench are -3 and the summary says gpu none', async () => {
    const skip = (name: string) => `echo "${name}: no CUDA device visible; skipped (cudaErrorNoDevice)"`;
    const build = await standIns('no-gpu', {
      cuda_ops: skip('cuda_ops'),
      cuda_smoke: skip('cuda_smoke'),
      cuda_bench: `echo '{"bench": "cuda", "skipped": "no CUDA device visible (cudaErrorNoDevice)"}'`,
    });
    const { summary, out } = await gpuCheck(build, { RF_GPU_CHECK_BENCH: 'quick' });
    expect(summary).toMatchObject({ build: 'ok', gpu: 'none', cuda: { cuda_ops: -3, cuda_smoke: -3 }, bench: -3, addon: -1, e2e: -1, demo: -1 });
    // The logs come back packed beside the summary.
    const { stdout } = await promisify(execFile)('tar', ['-tJf', join(out, 'gpu-check.tar.xz')]);
    expect(stdout.split('\n')).toEqual(expect.arrayContaining(['./summary.json', './cuda_ops.log', './cuda_bench.json', './device.txt']));
  });

  it('on a GPU: a failure runs again with RF_CUDA_PDL=0, a stage past the deadline is cut (124) and the later ones are -2', async () => {
    const build = await standIns('gpu', {
      cuda_gemm: '[ "${RF_CUDA_PDL:-1}" = 0 ] && exit 0\necho "cuda_gemm: 1 failed"; exit 1',
      cuda_ops: 'echo "cuda_ops: 40 passed, 0 failed"',
      cuda_train: 'exec sleep 100',
      cuda_train_ops: 'echo "cuda_train_ops: 9 passed, 0 failed"',
    });
    // 40 s in all: 15 are kept for packing, so cuda_train is stopped after about 25 s, and no
    // stage starts with under 20 s left.
    const t0 = performance.now();
    const { summary } = await gpuCheck(build, { RF_GPU_CHECK_BENCH: '0', RF_GPU_CHECK_DEADLINE: '40' });
    expect(summary['gpu']).toBe('ok');
    expect(summary['cuda']).toEqual({
      cuda_gemm: 1,
      'cuda_gemm with RF_CUDA_PDL=0': 0,
      cuda_ops: 0,
      cuda_train: 124,
      'cuda_train with RF_CUDA_PDL=0': -2,
      cuda_train_ops: -2,
    });
    expect((performance.now() - t0) / 1000).toBeLessThan(40);
  }, 60_000);

  it('RF_GPU_CHECK_BUILD=0 without an earlier build fails clearly, with the build marked failed', async () => {
    const missing = join(root, 'never-built');
    const out = join(root, 'out-missing');
    const run = promisify(execFile)('bash', [join(root, 'scripts', 'gpu-check.sh'), out], {
      env: { ...process.env, RF_GPU_CHECK_BUILD: '0', RF_GPU_CHECK_BUILD_DIR: missing },
    });
    await expect(run).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining(`there is no ${missing} to run`) });
    expect(JSON.parse(await readFile(join(out, 'summary.json'), 'utf8'))).toEqual({ build: 'failed', status: 2 });
  });
});
