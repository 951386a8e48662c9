// The GPU machine's end-to-end scripts (scripts/gpu-check.sh runs them with --device cuda) run here
// against the CPU itself, so their harness keeps working between the rare sessions with a GPU.
// They import dist/ (what the GPU machine carries): `npm ci` builds it; after editing lib/, run
// `npm run build:ts` first.
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';

const exec = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');

async function runScript(script: string): Promise<{ passed: number; failed: number; checks: { ok: boolean; what: string }[] }> {
  const { stdout } = await exec(process.execPath, [join(ROOT, 'scripts', script), '--device', 'cpu'], { cwd: ROOT, timeout: 240_000 })
    .catch((e: { stdout: string }) => ({ stdout: e.stdout }));
  return JSON.parse(stdout);
}

describe('device end-to-end scripts, against the CPU', () => {
  it('device-e2e.mjs: inference, the detector and the server', async () => {
    const r = await runScript('device-e2e.mjs');
    expect(r.checks.filter((c) => !c.ok)).toEqual([]);
    expect(r.passed).toBeGreaterThanOrEqual(10);
  }, 240_000);

  it('device-train-e2e.mjs: training, resume and the device default dtype', async () => {
    const r = await runScript('device-train-e2e.mjs');
    expect(r.checks.filter((c) => !c.ok)).toEqual([]);
    expect(r.passed).toBe(12);
  }, 240_000);

  it('device-eval-e2e.mjs: every eval suite, white-box and fine-tuning attacks included', async () => {
    const r = await runScript('device-eval-e2e.mjs');
    expect(r.checks.filter((c) => !c.ok)).toEqual([]);
    // where it ran, the cache, and one comparison per suite (9)
    expect(r.passed).toBe(11);
  }, 240_000);
});
