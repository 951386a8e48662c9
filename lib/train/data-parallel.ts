/**
 * Data-parallel training over several GPUs (`dataParallel` in the training config): one process
 * per GPU, each started with the same config but its own `rank` and device, all meeting through a
 * group id that rank 0 makes (NCCL's unique id) and writes to `idFile`, which the others wait for.
 * Each optimizer step's `gradAccum × worldSize` micro-batches are dealt round-robin over the
 * ranks; the native trainer sums the gradients over the group before every update (NCCL
 * all-reduce of the trainable gradients only: for LoRA a few MB), so every replica applies the
 * update a single process with `gradAccum × worldSize` accumulation steps would. Rank 0 alone
 * writes (metrics, checkpoints, the adapter) and evaluates.
 * @module
 */
import { readFile, rm } from 'node:fs/promises';

import { RedflagError, abortError } from '../errors.js';
import { addonFor, parseDevice } from '../model/device.js';
import { pathExists, writeFileAtomic } from '../model/safetensors.js';
import type { TrainConfig } from './config.js';

/** How long the other ranks wait for rank 0's id file. */
const WAIT_MS = 10 * 60_000;

/** The group to join: rank 0 makes the id and writes it; the others read it. */
export async function exchangeGroupId(config: TrainConfig, signal?: AbortSignal): Promise<{ id: string; rank: number; world: number }> {
  const dp = config.dataParallel!;
  if (dp.rank === 0) {
    if (await pathExists(dp.idFile)) {
      throw new RedflagError('INVALID_ARGUMENT', `dataParallel.idFile ${dp.idFile} exists (left by a run that did not start its group?): remove it, or name a new file`, {
        file: dp.idFile,
      });
    }
    const id = addonFor(parseDevice(config.device)).collectiveId!();
    await writeFileAtomic(dp.idFile, [new TextEncoder().encode(id + '\n')]);
    return { id, rank: 0, world: dp.worldSize };
  }
  const started = Date.now();
  for (;;) {
    if (signal?.aborted) throw abortError(signal);
    try {
      const id = (await readFile(dp.idFile, 'utf8')).trim();
      if (/^[0-9a-f]{256}$/.test(id)) return { id, rank: dp.rank, world: dp.worldSize };
    } catch {
      // not there yet
    }
    if (Date.now() - started > WAIT_MS) {
      throw new RedflagError('NOT_FOUND', `rank ${dp.rank}: no group id in ${dp.idFile} after ${WAIT_MS / 60_000} minutes: is rank 0 running with the same idFile?`, {
        file: dp.idFile,
      });
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** After the group formed (every rank joined): rank 0 removes the id file, so the next run cannot read a stale id. */
export async function groupFormed(config: TrainConfig): Promise<void> {
  if (config.dataParallel?.rank === 0) await rm(config.dataParallel.idFile, { force: true });
}
