// The CUDA build of the addon (`npm run build:cuda`, in build-cuda/), which .ci/run builds where
// nvcc is, linked with Debian's cuBLASLt when scripts/cuda-deps.sh could fetch it (.cuda-deps/):
// it loads on this machine, says what it holds, its CPU engine matches the golden logits as the
// default build's does, and asking it for a GPU fails with the runtime's reason where there is
// none (and matches the golden logits where there is one). Skipped where it is not built.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { RedflagError } from '../lib/errors.js';
import { loadModel } from '../lib/model/model.js';
import { loadAddonFrom, loadNative } from '../lib/native.js';
import { FIXTURES, readReference, relL2 } from './helpers/fixtures.js';

const ROOT = join(import.meta.dirname, '..');
const ADDON = join(ROOT, 'build-cuda', 'Release', 'redflag_cuda.node');
// What .ci/run fetched: the build it made must then hold the CUDA engine.
const FETCHED_CUBLASLT = existsSync(join(ROOT, '.cuda-deps', 'include', 'cublasLt.h'));
const addon = existsSync(ADDON) ? loadAddonFrom([ADDON]) : null;
// A CUDA build made where nvcc was missing is a CPU build; these tests are for the other kind.
const info = addon?.cudaInfo?.(0);
// The model tests' tolerances (test/model.test.ts): the same engine code, built by CMake.
const F32_TOLERANCE = 1e-5;
const BF16_TOLERANCE = 2e-2;

describe.skipIf(info === undefined)('the CUDA build of the addon', () => {
  // The default backend is then the CUDA build, for its CPU engine too.
  beforeAll(() => void vi.stubEnv('REDFLAG_BACKEND', 'cuda'));
  afterAll(() => void vi.unstubAllEnvs());

  it('loads and says what it holds', () => {
    expect(loadNative()).toBe(addon);
    expect(info!.architectures).toMatch(/^\d{2,3}/);
    expect(typeof info!.cublasLt).toBe('boolean');
    if (FETCHED_CUBLASLT) expect(info!.cublasLt, 'cuBLASLt was fetched into .cuda-deps/, but the CUDA build did not link it').toBe(true);
    expect(typeof info!.nccl).toBe('boolean');
    if (info!.count === 0) expect(info!.error).toMatch(/^cuda\w+: ./);
  });

  it('binds every symbol it needs at load (cuBLASLt\'s among them): none is missing from the libraries it was linked against', async () => {
    // A shared object links with undefined symbols left for the loader, which binds a function at
    // its first call; LD_BIND_NOW binds them all at load, so a missing one fails here, not on a GPU.
    const { stdout } = await promisify(execFile)(process.execPath, ['-e', `console.log(typeof require(${JSON.stringify(ADDON)}).cudaInfo)`], {
      env: { ...process.env, LD_BIND_NOW: '1' },
    });
    expect(stdout.trim()).toBe('function');
  });

  it.each(['llama-gqa', 'gpt2'])('its CPU engine matches the golden logits of %s in f32 and bf16', async (fixture) => {
    const { cases } = await readReference(fixture);
    for (const [dtype, tolerance] of [['f32', F32_TOLERANCE], ['bf16', BF16_TOLERANCE]] as const) {
      const model = await loadModel(join(FIXTURES, fixture), { dtype, threads: 2 });
      try {
        expect(model.device.name).toBe('cpu');
        for (const c of cases) expect(relL2(await model.logits(c.ids), c.logits), `${dtype} case ${c.name}`).toBeLessThan(tolerance);
      } finally {
        model.dispose();
      }
    }
  });

  it.skipIf((info?.count ?? 0) > 0)('without a GPU, a model on cuda is refused with the CUDA runtime\'s reason', async () => {
    const error = await loadModel(join(FIXTURES, 'llama-gqa'), { device: 'cuda' }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RedflagError);
    expect((error as RedflagError).code).toBe('NATIVE');
    const reason = info!.cublasLt ? /^device 'cuda:0': no usable CUDA device \(cuda\w+: .+\): a missing or too old NVIDIA driver, or no GPU/ : /no CUDA engine: cuBLASLt/;
    expect((error as Error).message).toMatch(reason);
  });

  it.skipIf((info?.count ?? 0) === 0 || !info?.cublasLt)('on a GPU, the CUDA engine matches the golden logits of llama-gqa', async () => {
    const { cases } = await readReference('llama-gqa');
    // The tolerances for the GPU: 1e-4 relative L2 in f32, 2e-2 in bf16.
    for (const [dtype, tolerance] of [['f32', 1e-4], ['bf16', BF16_TOLERANCE]] as const) {
      const model = await loadModel(join(FIXTURES, 'llama-gqa'), { device: 'cuda', dtype });
      try {
        for (const c of cases) expect(relL2(await model.logits(c.ids), c.logits), `${dtype} case ${c.name}`).toBeLessThan(tolerance);
      } finally {
        model.dispose();
      }
    }
  });
});
