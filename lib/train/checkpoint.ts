/**
 * Training checkpoints that survive a kill at any instant.
 *
 * Layout: each checkpoint is a folder `OUT/checkpoints/step-000120-<id>/` (`params.safetensors`,
 * `state.json`), and `OUT/checkpoint.json` names the current one with its files' sizes.
 * Publishing a checkpoint writes the new folder completely under a temporary name, renames it
 * into place, then replaces `checkpoint.json` with one rename: a kill before that rename leaves
 * the old pointer and its folder untouched, a kill after it the new ones. The superseded folder
 * is removed after publication; whatever a killed run left (temporary folders, superseded
 * copies) is removed at the next start. Resume reads the folder the pointer names, checking the
 * recorded sizes, so a damaged copy is an error that names the file instead of a wrong run.
 *
 * The previous layout (`OUT/checkpoint/`, replaced by two renames through `checkpoint.tmp-PID`
 * and `checkpoint.old-PID`) is still read: the newest complete copy among those folders is
 * resumed, which recovers from a kill between the two renames, and they are removed once a
 * checkpoint of the new layout is published.
 *
 * One run at a time writes to an output directory: `OUT/.train.lock` holds the writer's pid and
 * start time, and a lock whose process is gone (killed) is taken over.
 * @module
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { link, mkdir, open, readdir, readFile, realpath, rename, rm, rmdir, stat, unlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';

import { RedflagError } from '../errors.js';
import type { Model } from '../model/model.js';
import { pathExists, SafetensorsFile, writeFileAtomic, writeSafetensors, type RawTensor } from '../model/safetensors.js';
import type { TrainConfig } from './config.js';

const POINTER = 'checkpoint.json';
const FOLDER = 'checkpoints';
const LOCK = '.train.lock';
const LEGACY = /^checkpoint(\.(tmp|old)-\d+)?$/;
/** A checkpoint folder's name (`step-000120-<id>`, `.tmp` while it is written): only those are this code's to remove. */
const CHECKPOINT_NAME = /^step-\d{6,}-[0-9a-f]{8}(\.tmp)?$/;

interface CheckpointState {
  version: 1;
  step: number;
  config: TrainConfig;
  params: string[];
  /** sha256 of each data file the run read, by path (absent in checkpoints of earlier versions). */
  data?: Record<string, string>;
}

/** Bytes {@link dataFingerprints} reads at each of a weight file's start, middle and end. */
const WEIGHT_SAMPLE_BYTES = 1 << 20;

/**
 * sha256 of each file a run's result depends on, by path as configured: resume checks them, since
 * the same paths with other contents would continue the run on other data or another model.
 * Whole files: every training and evaluation file, the category map, and the model's config and
 * tokenizer files; of each weight file (gigabytes), its size and 1 MiB at its start (the header),
 * middle and end, which tell another checkpoint of the same shapes from this one.
 */
export async function dataFingerprints(config: TrainConfig): Promise<Record<string, string>> {
  const files = [...(config.data === 'synthetic' ? [] : config.data), ...(config.evalData ?? [])].map((d) => d.file);
  if (typeof config.categoryMap === 'string') files.push(config.categoryMap);
  for (const name of ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja']) {
    if (await pathExists(join(config.model, name))) files.push(join(config.model, name));
  }
  const out: Record<string, string> = {};
  for (const file of files) {
    if (file in out) continue;
    const hash = createHash('sha256');
    await pipeline(createReadStream(file), hash);
    out[file] = hash.digest('hex');
  }
  for (const name of (await readdir(config.model).catch(() => [] as string[])).filter((n) => n.endsWith('.safetensors')).sort()) {
    const file = join(config.model, name);
    const handle = await open(file, 'r');
    try {
      const { size } = await handle.stat();
      const hash = createHash('sha256').update(String(size));
      for (const at of [0, Math.max(0, Math.floor(size / 2) - WEIGHT_SAMPLE_BYTES / 2), Math.max(0, size - WEIGHT_SAMPLE_BYTES)]) {
        const buffer = Buffer.alloc(Math.min(WEIGHT_SAMPLE_BYTES, size));
        const { bytesRead } = await handle.read(buffer, 0, buffer.length, at);
        hash.update(buffer.subarray(0, bytesRead));
      }
      out[`${file} (sampled)`] = hash.digest('hex');
    } finally {
      await handle.close();
    }
  }
  return out;
}

interface Pointer {
  version: 2;
  /** The folder, relative to the output directory. */
  dir: string;
  step: number;
  /** Size in bytes of each file of the folder. */
  files: Record<string, number>;
}

/** A checkpoint found in an output directory. */
export interface FoundCheckpoint {
  /** Its folder (absolute or relative to the working directory, as the output was given). */
  dir: string;
  step: number;
  /** `checkpoint.json` (this layout), or the previous layout's folder. */
  layout: 'pointer' | 'legacy';
}

/** A test hook: `REDFLAG_TEST_KILL_AT=before-publish:N` (or `after-publish:N`) kills the process at the Nth publication. */
let publications = 0;
function testKillPoint(point: 'before-publish' | 'after-publish'): void {
  const spec = process.env['REDFLAG_TEST_KILL_AT'];
  if (!spec) return;
  const [where, n] = spec.split(':');
  if (where === point && Number(n) === publications) process.kill(process.pid, 'SIGKILL');
}

async function readPointer(output: string): Promise<Pointer | null> {
  const file = join(output, POINTER);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    if ((error as { code?: unknown }).code === 'ENOENT') return null;
    throw new RedflagError('INVALID_FILE', `cannot read the checkpoint pointer (${String((error as { code?: unknown }).code ?? error)})`, { file, cause: error });
  }
  try {
    const p = JSON.parse(text) as Pointer;
    if (p.version !== 2 || typeof p.dir !== 'string' || !Number.isInteger(p.step) || typeof p.files !== 'object' || p.files === null) throw new Error('unknown layout');
    return p;
  } catch (cause) {
    throw new RedflagError('INVALID_FILE', 'the checkpoint pointer is damaged (expected {"version": 2, "dir", "step", "files"})', { file, cause });
  }
}

/**
 * The previous layout's folders in `output`: `checkpoint.tmp-PID` and `checkpoint.old-PID`, and
 * `checkpoint` when it holds a state.json (that layout renamed only complete copies into place:
 * a `checkpoint` folder without one is the user's, as is anything else).
 */
async function legacyFolders(output: string): Promise<string[]> {
  const names: string[] = [];
  for (const name of (await readdir(output).catch(() => [] as string[])).filter((e) => LEGACY.test(e))) {
    if (name !== 'checkpoint' || (await pathExists(join(output, name, 'state.json')))) names.push(name);
  }
  return names;
}

async function legacyCopies(output: string): Promise<{ dir: string; step: number }[]> {
  const entries = await readdir(output).catch(() => [] as string[]);
  const found: { dir: string; step: number }[] = [];
  for (const name of entries.filter((e) => LEGACY.test(e))) {
    const dir = join(output, name);
    try {
      // state.json is written last into a copy: its presence marks a complete one.
      const state = JSON.parse(await readFile(join(dir, 'state.json'), 'utf8')) as CheckpointState;
      if (Number.isInteger(state.step) && (await pathExists(join(dir, 'params.safetensors')))) found.push({ dir, step: state.step });
    } catch {
      // incomplete (killed while writing): not a candidate
    }
  }
  return found.sort((a, b) => b.step - a.step);
}

/** The checkpoint to resume from in `output`, or null when there is none. */
export async function findCheckpoint(output: string): Promise<FoundCheckpoint | null> {
  const pointer = await readPointer(output);
  if (pointer) return { dir: join(output, pointer.dir), step: pointer.step, layout: 'pointer' };
  const [newest] = await legacyCopies(output);
  return newest ? { ...newest, layout: 'legacy' } : null;
}

/**
 * Removes what killed runs left in `output`: checkpoint folders the pointer does not name
 * (temporary or superseded) and, once a pointer exists, the previous layout's folders. Returns
 * the removed paths. Call it while holding the lock, before writing.
 */
export async function removeStaleCheckpoints(output: string): Promise<string[]> {
  const pointer = await readPointer(output);
  const removed: string[] = [];
  const folder = join(output, FOLDER);
  for (const name of await readdir(folder).catch(() => [] as string[])) {
    if (!CHECKPOINT_NAME.test(name) || (pointer && join(FOLDER, name) === pointer.dir)) continue; // another file is the user's
    // Without a pointer no folder of this layout was ever published: all are leftovers.
    await rm(join(folder, name), { recursive: true, force: true });
    removed.push(join(folder, name));
  }
  // The pointer's own temporary file (writeFileAtomic's `.NAME.PID.ID.tmp`) from a run killed
  // while it replaced the pointer: the lock is held, so no writer is using it.
  for (const name of (await readdir(output).catch(() => [] as string[])).filter((e) => e.startsWith(`.${POINTER}.`) && e.endsWith('.tmp'))) {
    await rm(join(output, name), { force: true });
    removed.push(join(output, name));
  }
  // Previous layout: once a pointer exists, all of it; else all but the newest complete copy
  // (the one resume uses).
  const [keep] = pointer ? [] : await legacyCopies(output);
  for (const name of await legacyFolders(output)) {
    if (keep && join(output, name) === keep.dir) continue;
    await rm(join(output, name), { recursive: true, force: true });
    removed.push(join(output, name));
  }
  return removed;
}

/** Removes every checkpoint in `output`, of either layout (starting over with `overwrite`). */
export async function removeCheckpoints(output: string): Promise<void> {
  await rm(join(output, POINTER), { force: true }); // first: a kill below leaves only leftovers
  const folder = join(output, FOLDER);
  for (const name of (await readdir(folder).catch(() => [] as string[])).filter((e) => CHECKPOINT_NAME.test(e))) await rm(join(folder, name), { recursive: true, force: true });
  await rmdir(folder).catch(() => undefined); // unless it holds files of the user's
  for (const name of await legacyFolders(output)) await rm(join(output, name), { recursive: true, force: true });
}

/** Writes the trainer state as a new checkpoint and publishes it (see the module description). */
export async function writeCheckpoint(model: Model, config: TrainConfig, step: number, data: Record<string, string>): Promise<void> {
  const output = config.output;
  const name = `step-${String(step).padStart(6, '0')}-${randomBytes(4).toString('hex')}`;
  const folder = join(output, FOLDER);
  const tmp = join(folder, `${name}.tmp`);
  await mkdir(tmp, { recursive: true });
  const params = model.engine.params();
  const tensors = new Map<string, RawTensor>();
  for (const p of params) {
    for (const part of ['value', 'm', 'v'] as const) {
      const data = model.engine.getParam(p.name, part);
      tensors.set(`${p.name}#${part}`, { dtype: 'F32', shape: [data.length], data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) });
    }
  }
  await writeSafetensors(join(tmp, 'params.safetensors'), tensors);
  const state: CheckpointState = { version: 1, step, config, params: params.map((p) => p.name), data };
  await writeFileAtomic(join(tmp, 'state.json'), [new TextEncoder().encode(JSON.stringify(state, null, 2))]);
  const files: Record<string, number> = {};
  for (const f of ['params.safetensors', 'state.json']) files[f] = (await stat(join(tmp, f))).size;
  await rename(tmp, join(folder, name));
  await syncDirectory(folder);

  const previous = await readPointer(output);
  publications++;
  testKillPoint('before-publish');
  const pointer: Pointer = { version: 2, dir: join(FOLDER, name), step, files };
  await writeFileAtomic(join(output, POINTER), [new TextEncoder().encode(JSON.stringify(pointer, null, 2) + '\n')], { overwrite: true });
  await syncDirectory(output);
  testKillPoint('after-publish');
  if (previous && previous.dir !== pointer.dir) await rm(join(output, previous.dir), { recursive: true, force: true });
  for (const legacy of await legacyFolders(output)) await rm(join(output, legacy), { recursive: true, force: true });
}

/** Makes a rename in `dir` durable (a directory fsync; skipped where the platform refuses it). */
async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r').catch(() => null);
  if (!handle) return;
  try {
    await handle.sync();
  } catch {
    // some file systems do not fsync directories
  } finally {
    await handle.close();
  }
}

/**
 * What of a configuration must match between a checkpoint's run and its resume: not the steps and
 * intervals (they may change), recompute (it changes memory and time but not one bit of a result:
 * the way on after a run out of GPU memory), the output (where the checkpoint was found), nor what
 * tells the processes of a data-parallel group apart (each rank resumes rank 0's checkpoint: its
 * rank, its GPU's index, the group's id file, new for each launch). The device's kind counts.
 */
function resumeRelevant(config: TrainConfig): Record<string, unknown> {
  const { steps: _steps, evalEvery: _evalEvery, checkpointEvery: _checkpointEvery, threads: _threads, overwrite: _overwrite, recompute: _recompute, output: _output, ...rest } =
    config as TrainConfig & Record<string, unknown>;
  const device = typeof config.device === 'string' ? config.device.replace(/:\d+$/, '') : config.device;
  const dataParallel = config.dataParallel ? { worldSize: config.dataParallel.worldSize } : undefined;
  return { ...rest, device, dataParallel };
}

/** The configuration fields that differ between a checkpoint's run and this one (see resumeRelevant). */
export function configDifferences(saved: TrainConfig, current: TrainConfig): string[] {
  const flat = (value: unknown, prefix: string, out: Map<string, string>): Map<string, string> => {
    if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) flat(v, prefix ? `${prefix}.${k}` : k, out);
    } else if (value !== undefined) {
      out.set(prefix, JSON.stringify(value));
    }
    return out;
  };
  const a = flat(resumeRelevant(saved), '', new Map());
  const b = flat(resumeRelevant(current), '', new Map());
  const keys = [...new Set([...a.keys(), ...b.keys()])].sort();
  return keys.filter((k) => a.get(k) !== b.get(k)).map((k) => `${k}: ${a.get(k) ?? '(unset)'} -> ${b.get(k) ?? '(unset)'}`);
}

/**
 * Restores the checkpoint in `config.output`; returns the step to continue from. `data` is
 * {@link dataFingerprints} of this run: a file whose contents changed since the checkpoint is an
 * error naming it, as is a checkpoint past `config.steps`.
 */
export async function readCheckpoint(model: Model, config: TrainConfig, data: Record<string, string>): Promise<number> {
  const found = await findCheckpoint(config.output);
  if (!found) throw new RedflagError('NOT_FOUND', 'no checkpoint to resume from', { file: config.output });
  const stateFile = join(found.dir, 'state.json');
  if (found.layout === 'pointer') {
    const pointer = (await readPointer(config.output))!;
    for (const [file, size] of Object.entries(pointer.files)) {
      const actual = await stat(join(found.dir, file)).then((s) => s.size, () => -1);
      if (actual !== size) {
        throw new RedflagError('INVALID_FILE', `the checkpoint is damaged: ${actual < 0 ? 'missing' : `${actual} bytes, ${size} recorded`}`, { file: join(found.dir, file) });
      }
    }
  }
  let state: CheckpointState;
  try {
    state = JSON.parse(await readFile(stateFile, 'utf8')) as CheckpointState;
  } catch (cause) {
    throw new RedflagError('INVALID_FILE', `the checkpoint state is unreadable (${(cause as Error).message})`, { file: stateFile, cause });
  }
  const differences = configDifferences(state.config, config);
  if (differences.length > 0) {
    throw new RedflagError('INVALID_ARGUMENT', `the checkpoint was written by a run with a different configuration; resume needs the same one (${differences.join('; ')})`, {
      file: stateFile,
    });
  }
  for (const [file, hash] of Object.entries(state.data ?? {})) {
    if (data[file] !== undefined && data[file] !== hash) {
      throw new RedflagError('INVALID_ARGUMENT', `changed since the checkpoint was written (its sha256 differs): resume needs the same data and model, or start over (--overwrite)`, { file });
    }
  }
  // The model's trainable parameters are the checkpoint's, name for name and size for size.
  const engine = new Map(model.engine.params().map((p) => [p.name, p.shape.reduce((a, b) => a * b, 1)]));
  const saved = new Set(state.params);
  const unsaved = [...engine.keys()].filter((name) => !saved.has(name));
  const unknown = state.params.filter((name) => !engine.has(name));
  if (unsaved.length > 0 || unknown.length > 0) {
    const list = (names: string[]) => `${names.slice(0, 3).join(', ')}${names.length > 3 ? ', …' : ''}`;
    throw new RedflagError(
      'INVALID_ARGUMENT',
      `the checkpoint's parameters are not this model's (${[unsaved.length ? `not in the checkpoint: ${list(unsaved)}` : '', unknown.length ? `not in the model: ${list(unknown)}` : ''].filter(Boolean).join('; ')}): resume needs the same model`,
      { file: stateFile },
    );
  }
  if (state.step > config.steps) {
    throw new RedflagError('INVALID_ARGUMENT', `the checkpoint is at step ${state.step}, past this run's steps (${config.steps}): resume with steps of at least ${state.step}`, {
      file: stateFile,
    });
  }
  const file = await SafetensorsFile.open(join(found.dir, 'params.safetensors'));
  try {
    for (const name of state.params) {
      for (const part of ['value', 'm', 'v'] as const) {
        const t = await file.read(`${name}#${part}`);
        model.engine.setParam(name, part, new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength)));
      }
    }
  } finally {
    await file.close();
  }
  model.engine.setOptimizerStep(state.step);
  return state.step;
}

/**
 * Drops the lines of `metrics.jsonl` past `step` (a killed run wrote them after its last
 * checkpoint; the resumed run writes them again), and with `finalEval` the evaluation line at
 * `step` too (a run resumed from its final checkpoint evaluates again), rewriting the file
 * atomically. Returns the number of lines dropped.
 */
export async function truncateMetrics(file: string, step: number, options: { finalEval?: boolean } = {}): Promise<number> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    if ((error as { code?: unknown }).code === 'ENOENT') return 0;
    throw error;
  }
  const lines = text.split('\n').filter((l) => l.length > 0);
  const kept = lines.filter((line) => {
    const record = metricsRecord(line);
    if (record === null) return false; // a line cut by the kill
    if (typeof record.step !== 'number') return true;
    return record.step < step || (record.step === step && !(options.finalEval && record.type === 'eval'));
  });
  if (kept.length === lines.length && text.endsWith('\n')) return 0;
  await writeFileAtomic(file, [new TextEncoder().encode(kept.map((l) => `${l}\n`).join(''))], { overwrite: true });
  return lines.length - kept.length;
}

/** One line of `metrics.jsonl` as a record, or null when it is not JSON (a line cut by a kill). */
function metricsRecord(line: string): { step?: unknown; type?: unknown } | null {
  try {
    return JSON.parse(line) as { step?: unknown; type?: unknown };
  } catch {
    return null;
  }
}

/**
 * Whether a metrics file is what a training run writes: every line a `step` or `eval` record
 * (an empty file too), but for a last line cut by the kill that stopped the run. Anything else
 * is not the trainer's to delete.
 */
export async function isRunMetrics(file: string): Promise<boolean> {
  const text = await readFile(file, 'utf8').catch(() => null);
  if (text === null) return false;
  const lines = text.split('\n').filter((line) => line.trim() !== '');
  return lines.every((line, i) => {
    const record = metricsRecord(line);
    if (record === null) return i === lines.length - 1 && !text.endsWith('\n');
    return (record.type === 'step' || record.type === 'eval') && Number.isInteger(record.step);
  });
}

/** Whether `metrics.jsonl` holds the evaluation line of `step`. */
export async function metricsHaveEval(file: string, step: number): Promise<boolean> {
  const text = await readFile(file, 'utf8').catch(() => '');
  return text.split('\n').some((line) => {
    const record = metricsRecord(line);
    return record !== null && record.type === 'eval' && record.step === step;
  });
}

/** Output directories this process holds the lock of (its pid in the lock file cannot tell two runs of one process apart). */
const heldHere = new Set<string>();

/**
 * When a process started (Linux: its start time in clock ticks after boot, with the boot's id),
 * so that a lock naming a pid another process has since been given is seen to be stale; '' where
 * /proc cannot tell.
 */
async function processStart(pid: number): Promise<string> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const boot = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
    return `${boot}:${fields[19]}`; // field 22 of the whole line: starttime
  } catch {
    return '';
  }
}

/** A lock file's holder: `pid start` (the start may be absent: locks of earlier versions, systems without /proc). */
function parseLock(text: string): { pid: number; start: string } {
  const [pid, start] = text.trim().split(/\s+/);
  return { pid: Number(pid), start: start ?? '' };
}

/** Whether a lock's holder still runs: its pid is alive and, where both are known, started when the lock says. */
async function holderAlive(holder: { pid: number; start: string }): Promise<boolean> {
  if (!Number.isInteger(holder.pid) || holder.pid <= 0 || !alive(holder.pid)) return false;
  if (holder.start === '') return true;
  const now = await processStart(holder.pid);
  return now === '' || now === holder.start;
}

/**
 * Takes the output directory's lock (one writer at a time); returns its release. The lock file
 * appears with its contents (written under a private name, then hard-linked into place: linking
 * fails when the lock exists), so no reader sees it empty. A stale lock (its process gone, or its
 * pid now another process's) is moved aside under a private name first, and taken over only if
 * what was moved is the stale one; release removes the lock only while it is this run's.
 */
export async function lockOutput(output: string): Promise<() => Promise<void>> {
  const file = join(output, LOCK);
  const key = await realpath(output).catch(() => resolve(output));
  if (heldHere.has(key)) throw new RedflagError('INVALID_ARGUMENT', 'another training run of this process is writing to this output directory', { file: output });
  const mine = `${process.pid} ${await processStart(process.pid)}\n`;
  const scratch = `${file}.${process.pid}.${randomBytes(4).toString('hex')}`;
  await writeFile(scratch, mine).catch((error: unknown) => {
    throw new RedflagError('INVALID_ARGUMENT', `cannot create the lock file (${String((error as { code?: unknown }).code ?? error)})`, { file, cause: error });
  });
  try {
    for (let attempt = 0; attempt < 4; attempt++) {
      try {
        await link(scratch, file);
        heldHere.add(key);
        return async () => {
          heldHere.delete(key);
          if ((await readFile(file, 'utf8').catch(() => '')) === mine) await unlink(file).catch(() => undefined);
        };
      } catch (error) {
        if ((error as { code?: unknown }).code !== 'EEXIST') {
          throw new RedflagError('INVALID_ARGUMENT', `cannot create the lock file (${String((error as { code?: unknown }).code ?? error)})`, { file, cause: error });
        }
      }
      const seen = await readFile(file, 'utf8').catch(() => null);
      if (seen === null) continue; // released meanwhile
      const holder = parseLock(seen);
      if (holder.pid !== process.pid && (await holderAlive(holder))) {
        throw new RedflagError(
          'INVALID_ARGUMENT',
          `another training run (pid ${holder.pid}) is writing to this output directory (its lock is ${file}: if no run is writing there, delete that file)`,
          { file: output },
        );
      }
      // Its process is gone (killed): move it aside, and take over only if what moved is that lock.
      const aside = `${file}.stale.${randomBytes(4).toString('hex')}`;
      if (await rename(file, aside).then(() => true, () => false)) {
        if ((await readFile(aside, 'utf8').catch(() => null)) !== seen) await link(aside, file).catch(() => undefined); // another run's new lock: put it back
        await unlink(aside).catch(() => undefined);
      }
    }
    throw new RedflagError('INVALID_ARGUMENT', 'cannot take the output directory lock (other runs keep taking it)', { file });
  } finally {
    await unlink(scratch).catch(() => undefined);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as { code?: unknown }).code === 'EPERM';
  }
}
