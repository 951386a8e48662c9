// The backend switch: `device` parsing, and one clear error naming what is missing (the CUDA
// build, CUDA itself in that build, a driver or GPU, the device ordinal) before any weight is read.
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';

import { Scheduler } from '../lib/detect/scheduler.js';
import { RedflagError } from '../lib/errors.js';
import { checkCudaAddon, checkDeviceRoom, parseDevice } from '../lib/model/device.js';
import { loadModel, type Model } from '../lib/model/model.js';
import { loadNative, type NativeAddon } from '../lib/native.js';
import { cudaUsable } from './helpers/cuda.js';
import { FIXTURES } from './helpers/fixtures.js';

const exec = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');

function fakeAddon(cuda?: { count: number; error: string; cublasLt?: boolean; unsupported?: (device: number) => string }): NativeAddon {
  const base = loadNative();
  return {
    ...base,
    ...(cuda
      ? {
          cudaInfo: (device = 0) => ({
            name: 'fake', smMajor: 9, smMinor: 0, memoryGiB: 141, architectures: '90', cublasLt: true, ...cuda,
            unsupported: device < cuda.count ? (cuda.unsupported?.(device) ?? '') : '',
          }),
        }
      : { cudaInfo: undefined }),
  } as NativeAddon;
}

describe('device', () => {
  it('parses cpu, cuda and cuda:N, and names the field of anything else', () => {
    expect(parseDevice(undefined)).toEqual({ kind: 'cpu', index: -1, name: 'cpu' });
    expect(parseDevice('cpu')).toEqual({ kind: 'cpu', index: -1, name: 'cpu' });
    expect(parseDevice('cuda')).toEqual({ kind: 'cuda', index: 0, name: 'cuda:0' });
    expect(parseDevice('cuda:3')).toEqual({ kind: 'cuda', index: 3, name: 'cuda:3' });
    for (const bad of ['gpu', 'cuda:', 'cuda:-1', 'cuda:x', 'CUDA', 'cuda:1:2', 3, null]) {
      expect(() => parseDevice(bad, 'options.device')).toThrow(/options\.device must be 'cpu', 'cuda' or 'cuda:N'/);
    }
  });

  it('says which of the CUDA build, its cuBLASLt, the driver or the GPU is missing', () => {
    const cuda = parseDevice('cuda:1');
    expect(() => checkCudaAddon(fakeAddon(), cuda)).toThrow(/compiled without CUDA \(nvcc was not found/);
    expect(() => checkCudaAddon(fakeAddon({ count: 0, error: 'cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version' }), cuda))
      .toThrow(/no usable CUDA device \(cudaErrorInsufficientDriver: .*\): a missing or too old NVIDIA driver, or no GPU/);
    expect(() => checkCudaAddon(fakeAddon({ count: 1, error: '' }), cuda)).toThrow(/'cuda:1': only 1 CUDA device visible \(cuda:0\)/);
    // A CUDA build without cuBLASLt describes GPUs but has no engine: said before the driver is.
    expect(() => checkCudaAddon(fakeAddon({ count: 0, error: 'cudaErrorNoDevice', cublasLt: false }), cuda))
      .toThrow(/'cuda:1': the CUDA build of the addon has no CUDA engine: cuBLASLt, which it needs, was not found .*--CDRF_CUBLASLT_ROOT=DIR/);
    const ok = fakeAddon({ count: 2, error: '' });
    expect(checkCudaAddon(ok, cuda)).toBe(ok);
  });

  it('refuses a GPU the build cannot run on with UNSUPPORTED and the native reason, for that device only', () => {
    const why = 'this build holds GPU code for 90 (CMake\'s CUDA_ARCHITECTURES), none of which runs on cuda:1 (A10, compute capability 8.6): rebuild it';
    const addon = fakeAddon({ count: 2, error: '', unsupported: (device) => (device === 1 ? why : '') });
    expect(checkCudaAddon(addon, parseDevice('cuda:0'))).toBe(addon);
    const refused = (() => {
      try {
        checkCudaAddon(addon, parseDevice('cuda:1'));
      } catch (error) {
        return error as RedflagError;
      }
    })();
    expect(refused?.code).toBe('UNSUPPORTED');
    expect(refused?.message).toBe(`device 'cuda:1': ${why}`);
  });

  it('refuses what does not fit a GPU with OUT_OF_MEMORY and the sizes, before allocating; the CPU is not checked', () => {
    const memory = { free: 3 * 2 ** 28, total: 80 * 2 ** 30, held: 2 ** 30, limit: 0 };
    const addon = { ...fakeAddon({ count: 1, error: '' }), cudaMemory: () => memory } as NativeAddon;
    const cuda = parseDevice('cuda');
    expect(() => checkDeviceRoom(addon, cuda, 3 * 2 ** 28, 'the weights (bf16)', '/m')).not.toThrow();
    const refused = (() => {
      try {
        checkDeviceRoom(addon, cuda, 2 * 2 ** 30, 'the weights (bf16)', '/m');
      } catch (error) {
        return error as RedflagError;
      }
    })();
    expect(refused?.code).toBe('OUT_OF_MEMORY');
    expect(refused?.message).toBe('/m: the weights (bf16) need 2.00 GiB on cuda:0, which has 768.0 MiB free of 80.00 GiB');
    memory.limit = 2 * 2 ** 30;
    expect(() => checkDeviceRoom(addon, cuda, 2 * 2 ** 30, 'the weights (bf16)')).toThrow(/768\.0 MiB free of 80\.00 GiB \(redflag holds 1\.00 GiB of the 2\.00 GiB it may use\)$/);
    expect(() => checkDeviceRoom(addon, parseDevice('cpu'), 2 ** 50, 'the weights')).not.toThrow();
  });

  it.skipIf(cudaUsable())('loadModel on a GPU that is not there fails at once, naming the device, and the CPU default is unchanged', async () => {
    // The directory does not exist: the device check comes before any file is read.
    const error = await loadModel('/nonexistent/model', { device: 'cuda' }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RedflagError);
    expect((error as Error).message).toMatch(/CUDA/);
    expect((error as Error).message).not.toMatch(/nonexistent/);
    await expect(loadModel(join(FIXTURES, 'llama-gqa'), { device: 'tpu' as never })).rejects.toThrow(/device must be/);
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    expect(model.device.name).toBe('cpu');
    expect(model.dtype).toBe('f32');
    model.dispose();
  });

  it('the scheduler budgets whole blocks of a paged cache at its bytes per position, single positions of the CPU\'s', async () => {
    const model = await loadModel(join(FIXTURES, 'llama-gqa'), { threads: 1 });
    try {
      const c = model.config;
      const perPosition = 2 * c.numLayers * c.numKvHeads * c.headDim * 4;  // f32 K and V on the CPU
      const options = { maxBatch: 1, kvCacheBytes: 1 << 30, maxQueued: 1, prefillChunk: 8, maxStepTokens: 8, rfToken: -1 };
      expect(model.kvBlockTokens).toBe(1);
      expect(model.kvBytesPerPosition).toBe(perPosition);
      expect(new Scheduler(model, options).bytesFor(17)).toBe(17 * perPosition);
      // A bf16 model on a GPU reports its block size (16) and its bf16 cache's bytes: 17
      // positions take two blocks of half the CPU's bytes per position.
      const paged = Object.create(model, { kvBlockTokens: { value: 16 }, kvBytesPerPosition: { value: perPosition / 2 } }) as Model;
      expect(new Scheduler(paged, options).bytesFor(17)).toBe(32 * perPosition / 2);
      expect(new Scheduler(paged, options).bytesFor(16)).toBe(16 * perPosition / 2);
    } finally {
      model.dispose();
    }
  });

  it('the CLI takes --device and answers a bad one with one line', async () => {
    const run = async (...args: string[]) => exec(process.execPath, ['--import', 'tsx', join(ROOT, 'lib', 'cli.ts'), ...args], { cwd: ROOT, timeout: 60_000 })
      .then(({ stdout }) => ({ code: 0, stdout, stderr: '' }), (e: { code: number; stdout: string; stderr: string }) => e);
    const bad = await run('info', '-m', join(FIXTURES, 'llama-gqa'), '--device', 'gpu');
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/device must be 'cpu', 'cuda' or 'cuda:N'/);
    // train's data-parallel flags reach the config's checks (a group runs one process per GPU).
    const model = join(FIXTURES, 'llama-gqa');
    const dp = await run('train', '--model', model, '--output', '/nonexistent/out', '--synthetic', '--world-size', '2', '--group-file', '/tmp/g');
    expect(dp.code).toBe(1);
    expect(dp.stderr).toMatch(/dataParallel \(--world-size\): runs one process per GPU/);
    const half = await run('train', '--model', model, '--output', '/nonexistent/out', '--synthetic', '--world-size', '2');
    expect(half.stderr).toMatch(/needs --world-size and --group-file/);
    const cpu = await run('info', '-m', join(FIXTURES, 'llama-gqa'), '--device', 'cpu', '--json');
    expect(JSON.parse(cpu.stdout).engine).toMatchObject({ device: 'cpu', dtype: 'f32', deviceMemory: null });
    if (!cudaUsable()) {
      const cuda = await run('info', '-m', join(FIXTURES, 'llama-gqa'), '--device', 'cuda');
      expect(cuda.code).toBe(1);
      expect(cuda.stderr.trim().split('\n')).toHaveLength(1);
      expect(cuda.stderr).toMatch(/CUDA/);
    }
  }, 60_000);
});
