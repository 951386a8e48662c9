/**
 * A hand-written reader and writer for the safetensors format
 * (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes
 * of UTF-8 JSON describing every tensor, then the raw little-endian tensor bytes.
 *
 * The reader never loads a whole file: it reads the header once and then each tensor's bytes
 * with a positioned read, so 5 GB shards cost only the memory of the tensor being read. Every
 * field of the header is validated, and every problem is reported as a {@link RedflagError}
 * naming the file and the tensor or field that is wrong.
 *
 * @module
 */
import { randomBytes } from 'node:crypto';
import { link, open, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';

import { RedflagError } from '../errors.js';

/** Element types that can appear in a safetensors header (every byte-sized one of the format). */
export type SafetensorsDType =
  | 'BOOL'
  | 'U8'
  | 'I8'
  | 'F8_E5M2'
  | 'F8_E4M3'
  | 'I16'
  | 'U16'
  | 'F16'
  | 'BF16'
  | 'I32'
  | 'U32'
  | 'F32'
  | 'F64'
  | 'I64'
  | 'U64';

const DTYPE_SIZES: Readonly<Record<SafetensorsDType, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

/** Every dtype this module understands, in a stable order (for error messages). */
export const SAFETENSORS_DTYPES: readonly SafetensorsDType[] = Object.keys(DTYPE_SIZES) as SafetensorsDType[];

/**
 * The largest header the reader accepts. The reference implementation uses the same limit: a
 * bigger length means a corrupt or hostile file, and honouring it would allocate that much memory.
 */
export const MAX_HEADER_BYTES = 100_000_000;

/** The header key that holds free-form string metadata rather than a tensor. */
const METADATA_KEY = '__metadata__';

/** Where one tensor lives in a safetensors file. */
export interface TensorInfo {
  /** The tensor's name as written in the header. */
  name: string;
  /** Element type. */
  dtype: SafetensorsDType;
  /** Dimensions, outermost first; `[]` is a scalar. */
  shape: number[];
  /** Absolute offset of the first byte in the file (8 + header length + `data_offsets[0]`). */
  byteOffset: number;
  /** Number of bytes: product(shape) × {@link dtypeSize}(dtype). */
  byteLength: number;
}

/** A tensor's bytes in memory, exactly as stored in safetensors: little-endian, row-major. */
export interface RawTensor {
  /** Element type. */
  dtype: SafetensorsDType;
  /** Dimensions, outermost first; `[]` is a scalar. */
  shape: number[];
  /** product(shape) × dtypeSize(dtype) little-endian bytes. */
  data: Uint8Array;
}

/**
 * A tensor whose bytes are made only when the writer reaches it: {@link writeSafetensors} then
 * holds one such tensor in memory at a time, not the whole file (a merged 8B model is 16 GB).
 */
export interface DeferredTensor {
  /** Element type. */
  dtype: SafetensorsDType;
  /** Dimensions, outermost first; `[]` is a scalar. */
  shape: number[];
  /** Makes the bytes, product(shape) × dtypeSize(dtype) of them (called once). */
  read: () => Promise<Uint8Array>;
}

/** Options for {@link SafetensorsFile.open}. */
export interface SafetensorsOpenOptions {
  /**
   * When true (the default), the data section must be exactly covered by the tensors, with no
   * gaps and no trailing bytes, as the format requires. `false` tolerates gaps (some hand-made
   * files have them); overlaps and out-of-bounds ranges are errors either way.
   */
  strict?: boolean;
}

/** The validated content of a safetensors header. */
export interface SafetensorsHeader {
  /** The `__metadata__` strings (empty when absent). */
  metadata: Record<string, string>;
  /** Tensors by name, in header order. */
  tensors: Map<string, TensorInfo>;
}

/** True when `value` names a dtype this module understands. */
export function isSafetensorsDType(value: unknown): value is SafetensorsDType {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(DTYPE_SIZES, value);
}

/** Bytes per element of `dtype`; throws for an unknown dtype (JS callers can pass anything). */
export function dtypeSize(dtype: SafetensorsDType): number {
  if (!isSafetensorsDType(dtype)) {
    throw new RedflagError('INVALID_ARGUMENT', `unknown dtype ${JSON.stringify(dtype)} (known: ${SAFETENSORS_DTYPES.join(', ')})`);
  }
  return DTYPE_SIZES[dtype];
}

/**
 * Number of elements of a tensor with this shape, or an error message when the shape is not an
 * array of non-negative safe integers or the product would not be a safe integer.
 */
function checkedElementCount(shape: unknown): number | string {
  if (!Array.isArray(shape)) return `shape must be an array of non-negative integers, got ${describe(shape)}`;
  let count = 1;
  for (let i = 0; i < shape.length; i++) {
    const dim: unknown = shape[i];
    if (typeof dim !== 'number' || !Number.isSafeInteger(dim) || dim < 0) {
      return `shape[${i}] must be a non-negative integer, got ${describe(dim)}`;
    }
    count *= dim;
    if (!Number.isSafeInteger(count)) return `shape ${JSON.stringify(shape)} has too many elements`;
  }
  return count;
}

/** Number of elements of a tensor with this shape (1 for a scalar). */
export function elementCount(shape: readonly number[]): number {
  const count = checkedElementCount(shape);
  if (typeof count === 'string') throw new RedflagError('INVALID_ARGUMENT', count);
  return count;
}

/** Bytes a tensor of this dtype and shape occupies. */
export function tensorByteLength(dtype: SafetensorsDType, shape: readonly number[]): number {
  const bytes = elementCount(shape) * dtypeSize(dtype);
  if (!Number.isSafeInteger(bytes)) throw new RedflagError('INVALID_ARGUMENT', `tensor of shape ${JSON.stringify(shape)} is too large`);
  return bytes;
}

/** A short, bounded description of an untrusted JSON value for error messages. */
function describe(value: unknown): string {
  if (value === undefined) return 'nothing';
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Validates a header and returns its tensors. `headerBytes` is the JSON (without the 8-byte
 * length); `dataLength` is the size of the data section that follows it. Exposed for tests and
 * for callers that hold a header in memory; {@link SafetensorsFile.open} uses it.
 */
export function parseSafetensorsHeader(
  headerBytes: Uint8Array,
  dataLength: number,
  options: SafetensorsOpenOptions & { file?: string } = {},
): SafetensorsHeader {
  const strict = options.strict ?? true;
  const fail = (message: string): RedflagError =>
    new RedflagError('INVALID_FILE', message, options.file === undefined ? {} : { file: options.file });

  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch {
    throw fail('safetensors header is not valid UTF-8');
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw fail(`safetensors header is not valid JSON (${(error as Error).message})`);
  }
  if (!isPlainObject(json)) throw fail(`safetensors header must be a JSON object, got ${describe(json)}`);

  const headerStart = 8 + headerBytes.byteLength;
  const metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  const ranges: Array<{ name: string; begin: number; end: number }> = [];

  for (const [name, entry] of Object.entries(json)) {
    if (name === METADATA_KEY) {
      // The reference implementation reads this as Option<HashMap<String, String>>: null is "none".
      if (entry === null) continue;
      if (!isPlainObject(entry)) throw fail(`"${METADATA_KEY}" must be an object of strings, got ${describe(entry)}`);
      for (const [key, value] of Object.entries(entry)) {
        if (typeof value !== 'string') {
          throw fail(`"${METADATA_KEY}"."${key}" must be a string, got ${describe(value)}`);
        }
        metadata[key] = value;
      }
      continue;
    }
    const where = `tensor "${name}"`;
    if (!isPlainObject(entry)) throw fail(`${where} must be an object with dtype, shape and data_offsets, got ${describe(entry)}`);
    const { dtype, shape, data_offsets: offsets } = entry;
    if (!isSafetensorsDType(dtype)) {
      throw fail(`${where}: unknown dtype ${describe(dtype)} (known: ${SAFETENSORS_DTYPES.join(', ')})`);
    }
    const count = checkedElementCount(shape);
    if (typeof count === 'string') throw fail(`${where}: ${count}`);
    if (
      !Array.isArray(offsets) ||
      offsets.length !== 2 ||
      !offsets.every((o): o is number => typeof o === 'number' && Number.isSafeInteger(o) && o >= 0)
    ) {
      throw fail(`${where}: data_offsets must be [begin, end] with non-negative integers, got ${describe(offsets)}`);
    }
    const [begin, end] = offsets as [number, number];
    if (begin > end) throw fail(`${where}: data_offsets [${begin}, ${end}] has begin > end`);
    const expected = count * DTYPE_SIZES[dtype];
    if (end - begin !== expected) {
      throw fail(
        `${where}: data_offsets [${begin}, ${end}] span ${end - begin} bytes but shape ${JSON.stringify(shape)} ` +
          `of ${dtype} (${DTYPE_SIZES[dtype]} bytes each) needs ${expected} bytes`,
      );
    }
    if (end > dataLength) {
      throw fail(`${where}: data_offsets [${begin}, ${end}] go beyond the data section, which is ${dataLength} bytes`);
    }
    tensors.set(name, {
      name,
      dtype,
      shape: [...(shape as number[])],
      byteOffset: headerStart + begin,
      byteLength: expected,
    });
    ranges.push({ name, begin, end });
  }

  checkCoverage(ranges, dataLength, strict, fail);
  return { metadata, tensors };
}

/**
 * Checks how the tensors tile the data section. Header key order does not matter (the reference
 * implementation sorts by offsets too); sorted by offset, each tensor must start where the
 * previous one ended: starting earlier is an overlap (always an error), starting later is a
 * hole (an error only in strict mode, like bytes left over at the end).
 */
function checkCoverage(
  ranges: Array<{ name: string; begin: number; end: number }>,
  dataLength: number,
  strict: boolean,
  fail: (message: string) => RedflagError,
): void {
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let covered = 0;
  let previous: string | null = null;
  for (const range of ranges) {
    const empty = range.begin === range.end;
    if (range.begin < covered && (strict || !empty)) {
      throw fail(
        `tensor "${range.name}" (bytes ${range.begin}..${range.end} of the data section) overlaps tensor "${previous}" ` +
          `(which ends at ${covered})`,
      );
    }
    if (strict && range.begin > covered) {
      const after = previous === null ? 'at the start of the data section' : `after tensor "${previous}"`;
      throw fail(
        `data section has a hole: bytes ${covered}..${range.begin} ${after} belong to no tensor ` +
          `(tensor "${range.name}" starts at ${range.begin}; pass strict: false to accept holes)`,
      );
    }
    if (range.end >= covered) {
      covered = range.end;
      previous = range.name;
    }
  }
  if (strict && covered !== dataLength) {
    throw fail(
      `data section is ${dataLength} bytes but the tensors cover only ${covered}: ${dataLength - covered} trailing bytes ` +
        `belong to no tensor (pass strict: false to accept them)`,
    );
  }
}

/** Reads exactly `length` bytes at `position` into `target`, in chunks below the 2 GiB read limit. */
async function readFully(
  handle: FileHandle,
  target: Uint8Array,
  position: number,
  describeShortRead: (got: number) => RedflagError,
): Promise<void> {
  const chunkLimit = 1 << 30;
  let done = 0;
  while (done < target.byteLength) {
    const length = Math.min(target.byteLength - done, chunkLimit);
    const { bytesRead } = await handle.read(target, done, length, position + done);
    if (bytesRead === 0) throw describeShortRead(done);
    done += bytesRead;
  }
}

/** Node's error code of a failed system call, if any. */
function errorCode(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error ? String((error as { code: unknown }).code) : undefined;
}

/**
 * An open safetensors file: header parsed and validated up front, tensors read on demand.
 * Call {@link SafetensorsFile.close} when done.
 */
export class SafetensorsFile {
  /** The path the file was opened from. */
  readonly path: string;
  /** The header's `__metadata__` strings (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Every tensor in the file, in header order. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Total file size in bytes. */
  readonly fileSize: number;
  #handle: FileHandle | null;

  private constructor(path: string, handle: FileHandle, header: SafetensorsHeader, fileSize: number) {
    this.path = path;
    this.#handle = handle;
    this.metadata = Object.freeze(header.metadata);
    this.tensors = header.tensors;
    this.fileSize = fileSize;
  }

  /** Opens and validates a safetensors file. Rejects with a RedflagError describing any problem. */
  static async open(path: string, options: SafetensorsOpenOptions = {}): Promise<SafetensorsFile> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (error) {
      const code = errorCode(error);
      if (code === 'ENOENT') throw new RedflagError('NOT_FOUND', 'safetensors file not found', { file: path, cause: error });
      throw new RedflagError('INVALID_FILE', `cannot open safetensors file (${code ?? String(error)})`, { file: path, cause: error });
    }
    try {
      const info = await handle.stat();
      if (!info.isFile()) throw new RedflagError('INVALID_FILE', 'not a regular file', { file: path });
      const header = await SafetensorsFile.#readHeader(handle, path, info.size, options);
      return new SafetensorsFile(path, handle, header, info.size);
    } catch (error) {
      await handle.close().catch(() => undefined);
      if (error instanceof RedflagError) throw error;
      throw new RedflagError('INVALID_FILE', `cannot read safetensors file (${String(error)})`, { file: path, cause: error });
    }
  }

  static async #readHeader(
    handle: FileHandle,
    path: string,
    fileSize: number,
    options: SafetensorsOpenOptions,
  ): Promise<SafetensorsHeader> {
    const fail = (message: string): RedflagError => new RedflagError('INVALID_FILE', message, { file: path });
    if (fileSize < 8) throw fail(`file is ${fileSize} bytes, shorter than the 8-byte safetensors header length`);
    const prefix = new Uint8Array(8);
    await readFully(handle, prefix, 0, () => fail('file ended while reading the header length'));
    const headerLength = new DataView(prefix.buffer).getBigUint64(0, true);
    if (headerLength === 0n) throw fail('header length is 0 (a safetensors header is at least "{}")');
    if (headerLength > BigInt(MAX_HEADER_BYTES)) {
      throw fail(`header length ${headerLength} exceeds the ${MAX_HEADER_BYTES}-byte limit (corrupt file?)`);
    }
    const length = Number(headerLength);
    if (8 + length > fileSize) {
      throw fail(`header length ${length} goes beyond the end of the file (file is ${fileSize} bytes)`);
    }
    const headerBytes = new Uint8Array(length);
    await readFully(handle, headerBytes, 8, () => fail('file ended while reading the header'));
    return parseSafetensorsHeader(headerBytes, fileSize - 8 - length, { ...options, file: path });
  }

  /** The tensor called `name`; rejects with NOT_FOUND when there is none. */
  info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (info === undefined) {
      const sample = [...this.tensors.keys()].slice(0, 5).map((n) => `"${n}"`).join(', ');
      throw new RedflagError('NOT_FOUND', `no tensor named "${name}" (the file has ${this.tensors.size}${sample ? `, e.g. ${sample}` : ''})`, {
        file: this.path,
      });
    }
    return info;
  }

  /** Reads one tensor's bytes (only those bytes) into a new Uint8Array. */
  async read(name: string): Promise<RawTensor> {
    const info = this.info(name);
    const handle = this.#handle;
    if (handle === null) throw new RedflagError('DISPOSED', `cannot read tensor "${name}": the file is closed`, { file: this.path });
    let data: Uint8Array;
    try {
      data = new Uint8Array(info.byteLength);
    } catch (error) {
      // V8 caps a typed array's length (4 GiB on 64-bit Node 20); say which tensor hit it.
      throw new RedflagError('UNSUPPORTED', `tensor "${name}" is ${info.byteLength} bytes, too large for one buffer`, { file: this.path, cause: error });
    }
    await readFully(handle, data, info.byteOffset, (got) =>
      new RedflagError('INVALID_FILE', `file ended after ${got} of ${info.byteLength} bytes of tensor "${name}" (truncated while open?)`, {
        file: this.path,
      }),
    );
    return { dtype: info.dtype, shape: [...info.shape], data };
  }

  /** Closes the file. Further reads reject with DISPOSED; closing twice is harmless. */
  async close(): Promise<void> {
    const handle = this.#handle;
    this.#handle = null;
    await handle?.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/** Whether something (file or folder) is at `path`. */
export async function pathExists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Options for {@link writeFileAtomic}. */
export interface AtomicWriteOptions {
  /** Replace an existing file at the destination. Default false: an existing file is an error. */
  overwrite?: boolean;
}

/**
 * Writes `chunks` to `path` atomically: into a temporary file in the same directory, fsync'd,
 * then moved into place, so readers see either the old file or the complete new one. Without
 * `overwrite: true` an existing file is never replaced (a hard link publishes the file, which
 * fails instead of replacing; where links are unsupported, an existence check precedes rename).
 */
export async function writeFileAtomic(
  path: string,
  chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
  options: AtomicWriteOptions = {},
): Promise<void> {
  const target = resolve(path);
  const refuse = (cause?: unknown): RedflagError =>
    new RedflagError('INVALID_ARGUMENT', 'refusing to overwrite an existing file (pass overwrite: true to replace it)', {
      file: path,
      cause,
    });
  const existing = await stat(target).catch((error: unknown) => {
    if (errorCode(error) === 'ENOENT') return null;
    throw new RedflagError('INVALID_ARGUMENT', `cannot write here (${errorCode(error) ?? String(error)})`, { file: path, cause: error });
  });
  if (existing?.isDirectory()) throw new RedflagError('INVALID_ARGUMENT', 'is a directory', { file: path });
  if (existing && !options.overwrite) throw refuse();

  const directory = dirname(target);
  const temporary = join(directory, `.${basename(target)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  let handle: FileHandle;
  try {
    handle = await open(temporary, 'wx');
  } catch (error) {
    throw new RedflagError('INVALID_ARGUMENT', `cannot create a temporary file next to it (${errorCode(error) ?? String(error)})`, {
      file: path,
      cause: error,
    });
  }
  let published = false;
  try {
    try {
      for await (const chunk of chunks) {
        let done = 0;
        while (done < chunk.byteLength) {
          const { bytesWritten } = await handle.write(chunk, done, Math.min(chunk.byteLength - done, 1 << 30));
          done += bytesWritten;
        }
      }
      await handle.sync();
    } finally {
      await handle.close();
    }
    await publish(temporary, target, options.overwrite ?? false, refuse);
    published = true;
    await syncDirectory(directory);
  } catch (error) {
    if (error instanceof RedflagError) throw error;
    throw new RedflagError('INVALID_ARGUMENT', `writing failed (${errorCode(error) ?? String(error)})`, { file: path, cause: error });
  } finally {
    if (!published) await unlink(temporary).catch(() => undefined);
  }
}

/** Moves the finished temporary file to `target`, never replacing a file unless allowed. */
async function publish(temporary: string, target: string, overwrite: boolean, refuse: (cause?: unknown) => RedflagError): Promise<void> {
  if (overwrite) {
    await rename(temporary, target);
    return;
  }
  try {
    // link() fails with EEXIST instead of replacing: no window between check and publish.
    await link(temporary, target);
    await unlink(temporary).catch(() => undefined);
    return;
  } catch (error) {
    if (errorCode(error) === 'EEXIST') throw refuse(error);
    // Filesystems without hard links (FAT, some network mounts): check, then rename.
  }
  const raced = await stat(target).then(
    () => true,
    () => false,
  );
  if (raced) throw refuse();
  await rename(temporary, target);
}

/** Makes the rename durable where the platform allows fsync on a directory (best effort). */
async function syncDirectory(directory: string): Promise<void> {
  try {
    const handle = await open(directory, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  } catch {
    // Windows and some filesystems cannot fsync a directory; the data itself is already synced.
  }
}

/** Options for {@link writeSafetensors}. */
export interface WriteSafetensorsOptions {
  /** Strings stored under `__metadata__` (e.g. `{ format: 'pt' }`, which transformers expects). */
  metadata?: Record<string, string>;
  /** Replace an existing file. Default false. */
  overwrite?: boolean;
}

/** Validates a tensor handed to the writer; returns its byte length. */
function checkTensor(name: string, tensor: RawTensor | DeferredTensor): number {
  const where = `tensor "${name}"`;
  if (typeof tensor !== 'object' || tensor === null) throw new RedflagError('INVALID_ARGUMENT', `${where} must be { dtype, shape, data } or { dtype, shape, read }`);
  if (!isSafetensorsDType(tensor.dtype)) {
    throw new RedflagError('INVALID_ARGUMENT', `${where}: unknown dtype ${describe(tensor.dtype)} (known: ${SAFETENSORS_DTYPES.join(', ')})`);
  }
  const count = checkedElementCount(tensor.shape);
  if (typeof count === 'string') throw new RedflagError('INVALID_ARGUMENT', `${where}: ${count}`);
  const expected = count * DTYPE_SIZES[tensor.dtype];
  if ('read' in tensor) {
    if (typeof tensor.read !== 'function') throw new RedflagError('INVALID_ARGUMENT', `${where}: read must be a function`);
    return expected;
  }
  checkTensorData(where, tensor.data, tensor, expected);
  return expected;
}

function checkTensorData(where: string, data: unknown, tensor: { dtype: SafetensorsDType; shape: number[] }, expected: number): asserts data is Uint8Array {
  if (!(data instanceof Uint8Array)) throw new RedflagError('INVALID_ARGUMENT', `${where}: data must be a Uint8Array`);
  if (data.byteLength !== expected) {
    throw new RedflagError('INVALID_ARGUMENT', `${where}: data is ${data.byteLength} bytes but shape ${JSON.stringify(tensor.shape)} of ${tensor.dtype} needs ${expected}`);
  }
}

/**
 * Serializes tensors to a safetensors file, atomically. Header keys are sorted by name; the data
 * is laid out contiguously, largest element size first (then by name), so every tensor starts
 * at a multiple of its element size, and the header is padded with spaces to a multiple of 8.
 * A {@link DeferredTensor}'s bytes are read when the writer reaches it and dropped after.
 */
export async function writeSafetensors(
  path: string,
  tensors: Map<string, RawTensor | DeferredTensor> | Record<string, RawTensor | DeferredTensor>,
  options: WriteSafetensorsOptions = {},
): Promise<void> {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  const sizes = new Map<string, number>();
  for (const [name, tensor] of entries) {
    if (name === METADATA_KEY) throw new RedflagError('INVALID_ARGUMENT', `"${METADATA_KEY}" is reserved and cannot name a tensor`, { file: path });
    try {
      sizes.set(name, checkTensor(name, tensor));
    } catch (error) {
      if (error instanceof RedflagError) throw new RedflagError(error.code, error.message, { file: path });
      throw error;
    }
  }
  if (options.metadata !== undefined) {
    for (const [key, value] of Object.entries(options.metadata)) {
      if (typeof value !== 'string') {
        throw new RedflagError('INVALID_ARGUMENT', `metadata "${key}" must be a string, got ${describe(value)}`, { file: path });
      }
    }
  }

  const byName = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);
  const dataOrder = [...entries].sort(
    ([nameA, a], [nameB, b]) => DTYPE_SIZES[b.dtype] - DTYPE_SIZES[a.dtype] || byName(nameA, nameB),
  );
  const offsets = new Map<string, [number, number]>();
  let cursor = 0;
  for (const [name] of dataOrder) {
    const size = sizes.get(name) ?? 0;
    offsets.set(name, [cursor, cursor + size]);
    cursor += size;
  }

  const header: Record<string, unknown> = {};
  if (options.metadata !== undefined && Object.keys(options.metadata).length > 0) {
    header[METADATA_KEY] = Object.fromEntries(Object.entries(options.metadata).sort(([a], [b]) => byName(a, b)));
  }
  for (const [name, tensor] of [...entries].sort(([a], [b]) => byName(a, b))) {
    header[name] = { dtype: tensor.dtype, shape: [...tensor.shape], data_offsets: offsets.get(name) };
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const paddedLength = Math.ceil(json.byteLength / 8) * 8;
  const headerBytes = new Uint8Array(paddedLength).fill(0x20);
  headerBytes.set(json);
  const prefix = new Uint8Array(8);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(paddedLength), true);

  async function* chunks(): AsyncIterable<Uint8Array> {
    yield prefix;
    yield headerBytes;
    for (const [name, tensor] of dataOrder) {
      if (!('read' in tensor)) {
        yield tensor.data;
        continue;
      }
      const data = await tensor.read();
      try {
        checkTensorData(`tensor "${name}"`, data, tensor, sizes.get(name)!);
      } catch (error) {
        throw new RedflagError((error as RedflagError).code, (error as RedflagError).message, { file: path });
      }
      yield data;
    }
  }
  await writeFileAtomic(path, chunks(), { overwrite: options.overwrite ?? false });
}

// ---------------------------------------------------------------------------------------------
// Float conversions
// ---------------------------------------------------------------------------------------------

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Little-endian bytes as 16-bit words (a view when aligned on a little-endian host, else a copy). */
function wordsOf(data: Uint8Array): Uint16Array {
  if (HOST_IS_LITTLE_ENDIAN && data.byteOffset % 2 === 0) return new Uint16Array(data.buffer, data.byteOffset, data.byteLength / 2);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const words = new Uint16Array(data.byteLength / 2);
  for (let i = 0; i < words.length; i++) words[i] = view.getUint16(i * 2, true);
  return words;
}

/** A typed array's contents as little-endian bytes. */
function littleEndianBytes(array: Uint16Array | Float32Array): Uint8Array {
  const bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
  if (HOST_IS_LITTLE_ENDIAN) return bytes;
  const swapped = new Uint8Array(bytes.byteLength);
  const width = array.BYTES_PER_ELEMENT;
  for (let i = 0; i < bytes.byteLength; i += width) {
    for (let j = 0; j < width; j++) swapped[i + j] = bytes[i + width - 1 - j] ?? 0;
  }
  return swapped;
}

/** The float32 whose bits are `bits` (exact: bfloat16 is the top half of a float32). */
export function bf16ToFloat32Bits(bits: number): number {
  return (bits & 0xffff) << 16 >>> 0;
}

/** Converts IEEE half-precision bits to float32 bits, exactly (subnormals, infinities, NaN payloads). */
export function f16ToFloat32Bits(half: number): number {
  const sign = (half & 0x8000) << 16;
  const exponent = (half >> 10) & 0x1f;
  const mantissa = half & 0x3ff;
  if (exponent === 0x1f) return (sign | 0x7f800000 | (mantissa << 13)) >>> 0;
  if (exponent !== 0) return (sign | ((exponent + 112) << 23) | (mantissa << 13)) >>> 0;
  if (mantissa === 0) return sign >>> 0;
  // Subnormal half: normalise the mantissa into a float32 exponent.
  let shift = 0;
  let m = mantissa;
  while ((m & 0x400) === 0) {
    m <<= 1;
    shift++;
  }
  return (sign | ((113 - shift) << 23) | ((m & 0x3ff) << 13)) >>> 0;
}

/** Rounds float32 bits to bfloat16 bits, to nearest even, like PyTorch (NaN becomes 0x7FC0). */
export function float32BitsToBf16(bits: number): number {
  const u = bits >>> 0;
  if ((u & 0x7f800000) === 0x7f800000 && (u & 0x007fffff) !== 0) return 0x7fc0;
  const roundingBias = ((u >>> 16) & 1) + 0x7fff;
  return ((u + roundingBias) >>> 16) & 0xffff;
}

/**
 * Rounds float32 bits to IEEE half bits, to nearest even (as PyTorch and NumPy do): values too
 * large become infinity, tiny ones subnormals or signed zero, NaN stays NaN.
 */
export function float32BitsToF16(bits: number): number {
  const f = bits >>> 0;
  const sign = (f >>> 16) & 0x8000;
  const exponent = f & 0x7f800000;
  if (exponent >= 0x47800000) {
    const mantissa = f & 0x007fffff;
    if (exponent === 0x7f800000 && mantissa !== 0) {
      const payload = 0x7c00 + (mantissa >>> 13);
      return sign + (payload === 0x7c00 ? 0x7c01 : payload);
    }
    return sign + 0x7c00;
  }
  if (exponent <= 0x38000000) {
    if (exponent < 0x33000000) return sign;
    const shift = 113 - (exponent >>> 23);
    let mantissa = (0x00800000 + (f & 0x007fffff)) >>> shift;
    // Round half to even: the low bits lost by the shift also decide whether it is a tie.
    if ((mantissa & 0x3fff) !== 0x1000 || (f & 0x7ff) !== 0) mantissa += 0x1000;
    return sign + (mantissa >>> 13);
  }
  let mantissa = f & 0x007fffff;
  if ((mantissa & 0x3fff) !== 0x1000) mantissa += 0x1000;
  // A carry out of the mantissa correctly bumps the exponent (up to infinity).
  return sign + ((exponent - 0x38000000) >>> 13) + (mantissa >>> 13);
}

/**
 * Converts a floating-point tensor (F32, F16, BF16 or F64) to a new Float32Array. F16 and BF16
 * convert exactly; F64 rounds to nearest.
 */
export function toFloat32(tensor: RawTensor): Float32Array {
  const count = elementCount(tensor.shape);
  if (!isSafetensorsDType(tensor.dtype)) throw new RedflagError('INVALID_ARGUMENT', `unknown dtype ${describe(tensor.dtype)}`);
  const expected = count * DTYPE_SIZES[tensor.dtype];
  if (tensor.data.byteLength !== expected) {
    throw new RedflagError(
      'INVALID_ARGUMENT',
      `tensor data is ${tensor.data.byteLength} bytes but shape ${JSON.stringify(tensor.shape)} of ${tensor.dtype} needs ${expected}`,
    );
  }
  const data = tensor.data;
  switch (tensor.dtype) {
    case 'F32': {
      const out = new Float32Array(count);
      if (HOST_IS_LITTLE_ENDIAN) {
        new Uint8Array(out.buffer).set(data);
      } else {
        const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
        for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true);
      }
      return out;
    }
    case 'F64': {
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat64(i * 8, true);
      return out;
    }
    case 'F16':
    case 'BF16': {
      const words = wordsOf(data);
      const out = new Float32Array(count);
      // Writing bits, not numbers, keeps NaN payloads and avoids any rounding.
      const outBits = new Uint32Array(out.buffer);
      if (tensor.dtype === 'BF16') {
        for (let i = 0; i < count; i++) outBits[i] = bf16ToFloat32Bits(words[i] ?? 0);
      } else {
        for (let i = 0; i < count; i++) outBits[i] = f16ToFloat32Bits(words[i] ?? 0);
      }
      return out;
    }
    default:
      throw new RedflagError('UNSUPPORTED', `toFloat32 converts F32, F16, BF16 and F64 tensors, not ${tensor.dtype}`);
  }
}

/**
 * Builds a tensor from float32 values in the requested dtype. F16 and BF16 round to nearest
 * even, bit-for-bit like PyTorch's `tensor.to(torch.float16 / torch.bfloat16)`.
 */
export function fromFloat32(data: Float32Array, shape: readonly number[], dtype: 'F32' | 'F16' | 'BF16'): RawTensor {
  const count = elementCount(shape);
  if (data.length !== count) {
    throw new RedflagError('INVALID_ARGUMENT', `fromFloat32: ${data.length} values do not fill shape ${JSON.stringify(shape)} (${count} elements)`);
  }
  if (dtype === 'F32') {
    return { dtype, shape: [...shape], data: littleEndianBytes(new Float32Array(data)) };
  }
  if (dtype !== 'F16' && dtype !== 'BF16') {
    throw new RedflagError('INVALID_ARGUMENT', `fromFloat32: dtype must be F32, F16 or BF16, got ${describe(dtype)}`);
  }
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const words = new Uint16Array(count);
  const round = dtype === 'BF16' ? float32BitsToBf16 : float32BitsToF16;
  for (let i = 0; i < count; i++) words[i] = round(bits[i] ?? 0);
  return { dtype, shape: [...shape], data: littleEndianBytes(words) };
}

/**
 * Rows `first` to `first + count - 1` of a float matrix [rows, …] (F32, F16, BF16 or F64) as
 * float32: only those rows' bytes are converted.
 */
export function rowsToFloat32(matrix: RawTensor, first: number, count: number): Float32Array {
  const width = elementCount(matrix.shape.slice(1));
  const size = dtypeSize(matrix.dtype);
  return toFloat32({ dtype: matrix.dtype, shape: [count, width], data: matrix.data.subarray(first * width * size, (first + count) * width * size) });
}

/**
 * A copy of a float matrix [V, width] (F32, F16 or BF16) grown to `total` rows, in which rows
 * `ids` hold `values` [ids.length × width] rounded to its dtype. Every other row is copied bit
 * for bit (rows from V on that are not in `ids` are zero), so only the new rows are converted:
 * an 8B model's embedding is not widened to f32 to change a row.
 */
export function withRowsSet(matrix: RawTensor, total: number, ids: readonly number[], values: Float32Array): RawTensor {
  const dtype = matrix.dtype;
  if (dtype !== 'F32' && dtype !== 'F16' && dtype !== 'BF16') throw new RedflagError('UNSUPPORTED', `rows of a ${dtype} matrix cannot be set (F32, F16 or BF16)`);
  if (matrix.shape.length !== 2) throw new RedflagError('INVALID_ARGUMENT', `expected a matrix [rows, width], got shape ${JSON.stringify(matrix.shape)}`);
  const [V, width] = matrix.shape as [number, number];
  const size = DTYPE_SIZES[dtype];
  if (matrix.data.byteLength !== V * width * size) {
    throw new RedflagError('INVALID_ARGUMENT', `matrix data is ${matrix.data.byteLength} bytes, expected ${V * width * size} for [${V}, ${width}] ${dtype}`);
  }
  if (!Number.isInteger(total) || total < V) throw new RedflagError('INVALID_ARGUMENT', `cannot shrink a matrix of ${V} rows to ${total}`);
  if (values.length !== ids.length * width) throw new RedflagError('INVALID_ARGUMENT', `${ids.length} row(s) of ${width} values need ${ids.length * width}, got ${values.length}`);
  for (const id of ids) if (!Number.isInteger(id) || id < 0 || id >= total) throw new RedflagError('INVALID_ARGUMENT', `row ${id} is not below ${total}`);
  const data = new Uint8Array(total * width * size);
  data.set(matrix.data);
  ids.forEach((id, k) => data.set(fromFloat32(values.subarray(k * width, (k + 1) * width), [width], dtype).data, id * width * size));
  return { dtype, shape: [total, width], data };
}
