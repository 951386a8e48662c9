import { mkdtemp, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { RedflagError } from '../lib/errors.js';
import {
  SafetensorsFile,
  dtypeSize,
  f16ToFloat32Bits,
  float32BitsToBf16,
  float32BitsToF16,
  fromFloat32,
  rowsToFloat32,
  toFloat32,
  withRowsSet,
  writeSafetensors,
  type RawTensor,
} from '../lib/model/safetensors.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'redflag-safetensors-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

let fileCounter = 0;
const nextPath = (): string => join(dir, `t${fileCounter++}.safetensors`);

/** The bits of a float32 value. */
const bitsOf = (value: number): number => new Uint32Array(new Float32Array([value]).buffer)[0] as number;
/** The float32 value of bits. */
const floatOf = (bits: number): number => new Float32Array(new Uint32Array([bits]).buffer)[0] as number;

/** A safetensors file from a header (object or raw text) and data bytes, without validation. */
function buildFile(header: unknown, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array {
  const json = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + json.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(json.byteLength), true);
  out.set(json, 8);
  out.set(data, 8 + json.byteLength);
  return out;
}

async function writeRaw(bytes: Uint8Array): Promise<string> {
  const path = nextPath();
  await writeFile(path, bytes);
  return path;
}

/** Opening must fail with an INVALID_FILE RedflagError whose message matches and names the file. */
async function expectInvalid(bytes: Uint8Array, pattern: RegExp, options?: { strict?: boolean }): Promise<void> {
  const path = await writeRaw(bytes);
  const error = await SafetensorsFile.open(path, options).then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(RedflagError);
  expect((error as RedflagError).code).toBe('INVALID_FILE');
  expect((error as RedflagError).message).toContain(path);
  expect((error as RedflagError).message).toMatch(pattern);
}

const twoTensors = {
  a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
  b: { dtype: 'I16', shape: [2, 2], data_offsets: [8, 16] },
};

describe('float conversions', () => {
  it('rounds float32 to float16 to nearest even, like PyTorch', () => {
    const cases: Array<[number, number]> = [
      [1, 0x3c00],
      [-2, 0xc000],
      [0.1, 0x2e66], // torch.tensor(0.1).half() == 0.0999755859375
      [1 / 3, 0x3555],
      [65504, 0x7bff], // largest half
      [65519, 0x7bff], // below the midpoint to 65536
      [65520, 0x7c00], // the midpoint: ties to even, which overflows to +inf
      [1e6, 0x7c00],
      [-1e6, 0xfc00],
      [1 + 2 ** -11, 0x3c00], // tie between 1 and 1+2^-10: even mantissa wins
      [1 + 3 * 2 ** -11, 0x3c02], // tie between odd 0x3c01 and even 0x3c02
      [1 + 2 ** -11 + 2 ** -20, 0x3c01], // just above the tie
      [2 ** -24, 0x0001], // smallest subnormal
      [2 ** -25, 0x0000], // tie with zero: rounds to even (zero)
      [2 ** -25 * 1.5, 0x0001],
      [3 * 2 ** -25, 0x0002], // tie between subnormals 1 and 2
      [2 ** -14, 0x0400], // smallest normal
      [2 ** -14 - 2 ** -25, 0x0400], // rounds up from the subnormal range into the normals
      [-0, 0x8000],
      [Infinity, 0x7c00],
      [-Infinity, 0xfc00],
    ];
    for (const [value, expected] of cases) expect(float32BitsToF16(bitsOf(value)), `f16(${value})`).toBe(expected);
    expect(float32BitsToF16(0x7fc00000)).toBe(0x7e00); // quiet NaN stays NaN
    expect(float32BitsToF16(0x7f800001)).toBe(0x7c01); // a payload lost in the shift still leaves a NaN
  });

  it('rounds float32 to bfloat16 to nearest even, like PyTorch', () => {
    const cases: Array<[number, number]> = [
      [bitsOf(1), 0x3f80],
      [bitsOf(0.1), 0x3dcd], // torch.tensor(0.1).bfloat16() == 0.10009765625
      [bitsOf(Math.PI), 0x4049], // 3.140625
      [0x3f808000, 0x3f80], // tie, even stays
      [0x3f818000, 0x3f82], // tie, odd rounds up
      [0x3f808001, 0x3f81], // above the tie
      [0x7f7fffff, 0x7f80], // float32 max rounds to +inf
      [0xff7fffff, 0xff80],
      [bitsOf(-0), 0x8000],
      [0x00000001, 0x0000], // smallest float32 subnormal
      [0x7f800000, 0x7f80],
    ];
    for (const [bits, expected] of cases) expect(float32BitsToBf16(bits), `bf16(0x${bits.toString(16)})`).toBe(expected);
    expect(float32BitsToBf16(0x7fa00000)).toBe(0x7fc0); // every NaN becomes the canonical one
    expect(float32BitsToBf16(0xffc00001)).toBe(0x7fc0);
  });

  it('widens float16 bits to float32 exactly', () => {
    expect(floatOf(f16ToFloat32Bits(0x3c00))).toBe(1);
    expect(floatOf(f16ToFloat32Bits(0x3555))).toBe(0.333251953125);
    expect(floatOf(f16ToFloat32Bits(0x7bff))).toBe(65504);
    expect(floatOf(f16ToFloat32Bits(0x0001))).toBe(2 ** -24);
    expect(floatOf(f16ToFloat32Bits(0x03ff))).toBe(1023 * 2 ** -24);
    expect(floatOf(f16ToFloat32Bits(0x8000))).toBe(-0);
    expect(floatOf(f16ToFloat32Bits(0xfc00))).toBe(-Infinity);
    expect(Number.isNaN(floatOf(f16ToFloat32Bits(0x7e00)))).toBe(true);
    // Every finite half survives half → float32 → half.
    for (let h = 0; h < 0x10000; h++) {
      if ((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0) continue;
      if (float32BitsToF16(f16ToFloat32Bits(h)) !== h) throw new Error(`round trip failed for 0x${h.toString(16)}`);
    }
  });

  it('converts tensors between float32 and F16/BF16/F64', () => {
    const values = new Float32Array([0, 1, -2.5, 0.1, 65504, 1e-8, 3.4e38]);
    const half = fromFloat32(values, [7], 'F16');
    expect(half.data.byteLength).toBe(14);
    expect([...toFloat32(half)]).toEqual([0, 1, -2.5, 0.0999755859375, 65504, 0, Infinity]);
    const brain = fromFloat32(values, [7], 'BF16');
    expect([...new Uint16Array(brain.data.buffer)]).toEqual([0, 0x3f80, 0xc020, 0x3dcd, 0x4780, 0x322c, 0x7f80]);
    expect([...toFloat32(brain)].slice(0, 4)).toEqual([0, 1, -2.5, 0.10009765625]);
    const full = fromFloat32(values, [7], 'F32');
    expect(toFloat32(full)).toEqual(values);
    const f64: RawTensor = { dtype: 'F64', shape: [2], data: new Uint8Array(new Float64Array([0.1, -1e300]).buffer) };
    expect([...toFloat32(f64)]).toEqual([Math.fround(0.1), -Infinity]);
    expect(() => toFloat32({ dtype: 'I32', shape: [1], data: new Uint8Array(4) })).toThrow(/F32, F16, BF16 and F64/);
    expect(() => toFloat32({ dtype: 'F32', shape: [3], data: new Uint8Array(8) })).toThrow(/8 bytes but shape \[3\]/);
    expect(() => fromFloat32(values, [2, 2], 'F16')).toThrow(/7 values do not fill shape \[2,2\]/);
  });

  it('sets and reads rows of a matrix converting only those rows; the others keep their bits', () => {
    for (const dtype of ['F32', 'F16', 'BF16'] as const) {
      const [V, W] = [5, 3];
      const base = fromFloat32(Float32Array.from({ length: V * W }, (_, i) => (i - 7) / 3), [V, W], dtype);
      // A NaN with a payload in row 1 must come through untouched (a round trip through f32 math would not).
      const nanBits = dtype === 'F32' ? [0x01, 0x00, 0xc0, 0x7f] : dtype === 'F16' ? [0x01, 0x7e] : [0x81, 0x7f];
      base.data.set(nanBits, W * dtypeSize(dtype));
      expect(rowsToFloat32(base, 2, 2)).toEqual(toFloat32(base).subarray(2 * W, 4 * W));
      const values = Float32Array.from([0.1, 0.2, 0.3, -1, -2, -3]);
      const grown = withRowsSet(base, 7, [3, 6], values);
      expect(grown.shape).toEqual([7, W]);
      // The naive way: every row through f32, the new ones rounded to the dtype.
      const want = new Float32Array(7 * W);
      want.set(toFloat32(base));
      want.set(toFloat32(fromFloat32(values.subarray(0, W), [W], dtype)), 3 * W);
      want.set(toFloat32(fromFloat32(values.subarray(W), [W], dtype)), 6 * W);
      expect(toFloat32(grown)).toEqual(want);
      const size = dtypeSize(dtype);
      expect([...grown.data.subarray(W * size, W * size + nanBits.length)]).toEqual(nanBits);
      expect([...grown.data.subarray(5 * W * size, 6 * W * size)].every((b) => b === 0)).toBe(true); // appended, not set
    }
    const m = fromFloat32(new Float32Array(6), [2, 3], 'BF16');
    expect(() => withRowsSet(m, 1, [0], new Float32Array(3))).toThrow(/shrink a matrix of 2 rows to 1/);
    expect(() => withRowsSet(m, 3, [3], new Float32Array(3))).toThrow(/row 3 is not below 3/);
    expect(() => withRowsSet(m, 3, [2], new Float32Array(2))).toThrow(/1 row\(s\) of 3 values need 3, got 2/);
    expect(() => withRowsSet({ dtype: 'I32', shape: [1, 1], data: new Uint8Array(4) }, 1, [0], new Float32Array(1))).toThrow(/I32 matrix/);
  });

  it('knows every dtype size', () => {
    expect(dtypeSize('BF16')).toBe(2);
    expect(dtypeSize('F64')).toBe(8);
    expect(dtypeSize('BOOL')).toBe(1);
    expect(() => dtypeSize('F3' as never)).toThrow(/unknown dtype "F3"/);
  });
});

describe('writeSafetensors + SafetensorsFile', () => {
  it('round-trips every float dtype and the integer ones', async () => {
    const values = new Float32Array([1.5, -0.25, 3, 1e-3, 7, -8]);
    const tensors: Record<string, RawTensor> = {
      'model.f32': fromFloat32(values, [2, 3], 'F32'),
      'model.f16': fromFloat32(values, [3, 2], 'F16'),
      'model.bf16': fromFloat32(values, [6], 'BF16'),
      'model.f64': { dtype: 'F64', shape: [2], data: new Uint8Array(new Float64Array([Math.PI, -1]).buffer) },
      'model.i64': { dtype: 'I64', shape: [1], data: new Uint8Array(new BigInt64Array([-5n]).buffer) },
      'model.i8': { dtype: 'I8', shape: [3], data: new Uint8Array([255, 0, 1]) },
      'model.bool': { dtype: 'BOOL', shape: [2], data: new Uint8Array([1, 0]) },
      'model.scalar': { dtype: 'F32', shape: [], data: new Uint8Array(new Float32Array([42]).buffer) },
      'model.empty': { dtype: 'F16', shape: [0, 4], data: new Uint8Array(0) },
    };
    const path = nextPath();
    await writeSafetensors(path, tensors, { metadata: { format: 'pt' } });
    const file = await SafetensorsFile.open(path);
    try {
      expect(file.metadata).toEqual({ format: 'pt' });
      expect([...file.tensors.keys()].sort()).toEqual(Object.keys(tensors).sort());
      for (const [name, tensor] of Object.entries(tensors)) {
        const read = await file.read(name);
        expect(read.dtype).toBe(tensor.dtype);
        expect(read.shape).toEqual(tensor.shape);
        expect(read.data).toEqual(tensor.data);
      }
      expect([...toFloat32(await file.read('model.f16'))]).toEqual([1.5, -0.25, 3, 0.0010004043579101562, 7, -8]);
      expect([...toFloat32(await file.read('model.bf16'))]).toEqual([1.5, -0.25, 3, 0.00099945068359375, 7, -8]);
      expect([...toFloat32(await file.read('model.f64'))]).toEqual([Math.fround(Math.PI), -1]);
      // Largest elements first keeps every tensor aligned to its element size.
      for (const info of file.tensors.values()) expect(info.byteOffset % dtypeSize(info.dtype)).toBe(0);
    } finally {
      await file.close();
    }
  });

  it('writes the canonical layout: sorted keys, spaces to a multiple of 8', async () => {
    const path = nextPath();
    await writeSafetensors(path, new Map([['w', { dtype: 'F32', shape: [1], data: new Uint8Array(new Float32Array([1]).buffer) }]]));
    const bytes = new Uint8Array(await readFile(path));
    const json = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}';
    const padded = json.padEnd(Math.ceil(json.length / 8) * 8, ' ');
    expect(Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true))).toBe(padded.length);
    expect(new TextDecoder().decode(bytes.subarray(8, 8 + padded.length))).toBe(padded);
    expect([...bytes.subarray(8 + padded.length)]).toEqual([0, 0, 0x80, 0x3f]);
  });

  it('refuses to overwrite unless asked, atomically and without leftovers', async () => {
    const path = nextPath();
    const one = { x: fromFloat32(new Float32Array([1]), [1], 'F32') };
    const two = { x: fromFloat32(new Float32Array([2]), [1], 'F32') };
    await writeSafetensors(path, one);
    const before = await readFile(path);
    await expect(writeSafetensors(path, two)).rejects.toThrow(/refusing to overwrite/);
    expect(await readFile(path)).toEqual(before);
    await writeSafetensors(path, two, { overwrite: true });
    const file = await SafetensorsFile.open(path);
    expect([...toFloat32(await file.read('x'))]).toEqual([2]);
    await file.close();
    expect((await readdir(dir)).filter((name) => name.endsWith('.tmp'))).toEqual([]);
  });

  it('validates tensors before writing anything', async () => {
    const path = nextPath();
    await expect(writeSafetensors(path, { x: { dtype: 'F32', shape: [3], data: new Uint8Array(8) } })).rejects.toThrow(
      /tensor "x": data is 8 bytes but shape \[3\] of F32 needs 12/,
    );
    await expect(writeSafetensors(path, { x: { dtype: 'F9' as never, shape: [1], data: new Uint8Array(1) } })).rejects.toThrow(/unknown dtype/);
    await expect(writeSafetensors(path, { x: { dtype: 'U8', shape: [-1], data: new Uint8Array(0) } })).rejects.toThrow(/shape\[0\]/);
    await expect(
      writeSafetensors(path, { x: fromFloat32(new Float32Array(1), [1], 'F32') }, { metadata: { k: 1 as never } }),
    ).rejects.toThrow(/metadata "k" must be a string/);
    expect((await readdir(dir)).some((name) => name === path.split('/').pop())).toBe(false);
  });

  it('writes deferred tensors as the same bytes, reading each once, in data order, only when the writer reaches it', async () => {
    const tensors: Record<string, RawTensor> = {
      b: fromFloat32(new Float32Array([1, 2, 3]), [3], 'F32'),
      a: fromFloat32(new Float32Array([4, 5]), [2], 'BF16'),
      c: fromFloat32(new Float32Array([6]), [1], 'F32'),
    };
    const eager = nextPath();
    await writeSafetensors(eager, tensors, { metadata: { format: 'pt' } });
    const reads: string[] = [];
    const deferred = Object.fromEntries(
      Object.entries(tensors).map(([name, t]) => [name, { dtype: t.dtype, shape: t.shape, read: async () => (reads.push(name), t.data) }]),
    );
    const lazy = nextPath();
    const writing = writeSafetensors(lazy, deferred, { metadata: { format: 'pt' } });
    expect(reads).toEqual([]); // nothing is read before the header is out
    await writing;
    expect(reads).toEqual(['b', 'c', 'a']); // F32 before BF16, then by name
    expect(await readFile(lazy)).toEqual(await readFile(eager));
  });

  it('a deferred tensor of the wrong size or a failing read leaves no file behind, naming the tensor and the file', async () => {
    const path = nextPath();
    const short = { x: { dtype: 'F32' as const, shape: [3], read: async () => new Uint8Array(8) } };
    await expect(writeSafetensors(path, short)).rejects.toMatchObject({
      file: path,
      message: expect.stringMatching(/tensor "x": data is 8 bytes but shape \[3\] of F32 needs 12/),
    });
    const failing = { x: { dtype: 'F32' as const, shape: [1], read: async () => Promise.reject(new RedflagError('INVALID_FILE', 'shard truncated')) } };
    await expect(writeSafetensors(path, failing)).rejects.toThrow(/shard truncated/);
    const names = await readdir(dir);
    expect(names.some((name) => name === path.split('/').pop() || name.endsWith('.tmp'))).toBe(false);
  });

  it('reads only the requested tensor, and not after close', async () => {
    const path = nextPath();
    await writeSafetensors(path, { a: fromFloat32(new Float32Array([1, 2]), [2], 'F32') });
    const file = await SafetensorsFile.open(path);
    await expect(file.read('nope')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await file.close();
    await expect(file.read('a')).rejects.toMatchObject({ code: 'DISPOSED' });
    await file.close();
  });

  it('reports a missing file as NOT_FOUND', async () => {
    await expect(SafetensorsFile.open(join(dir, 'missing.safetensors'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});

describe('rejects malformed files with precise errors', () => {
  const data16 = new Uint8Array(16);

  it('file shorter than 8 bytes', async () => {
    await expectInvalid(new Uint8Array(5), /5 bytes, shorter than the 8-byte/);
  });
  it('header length 0', async () => {
    await expectInvalid(buildFile('', new Uint8Array(4), 0n), /header length is 0/);
  });
  it('absurd header length', async () => {
    await expectInvalid(buildFile('{}', new Uint8Array(0), 200_000_000n), /header length 200000000 exceeds the 100000000-byte limit/);
    await expectInvalid(buildFile('{}', new Uint8Array(0), 0xffffffffffffffffn), /exceeds/);
  });
  it('header length beyond the file', async () => {
    await expectInvalid(buildFile('{}', new Uint8Array(0), 50n), /header length 50 goes beyond the end of the file \(file is 10 bytes\)/);
  });
  it('invalid UTF-8', async () => {
    const bytes = buildFile('{"a":1}');
    bytes[10] = 0xff;
    await expectInvalid(bytes, /not valid UTF-8/);
  });
  it('invalid JSON', async () => {
    await expectInvalid(buildFile('{"a": '), /not valid JSON/);
  });
  it('header that is not an object', async () => {
    await expectInvalid(buildFile('[1,2]'), /must be a JSON object, got \[1,2\]/);
    await expectInvalid(buildFile('null'), /must be a JSON object/);
  });
  it('tensor entry that is not an object', async () => {
    await expectInvalid(buildFile({ a: 3 }), /tensor "a" must be an object/);
  });
  it('unknown dtype', async () => {
    await expectInvalid(buildFile({ ...twoTensors, a: { ...twoTensors.a, dtype: 'F7' } }, data16), /tensor "a": unknown dtype "F7"/);
    await expectInvalid(buildFile({ ...twoTensors, a: { shape: [2], data_offsets: [0, 8] } }, data16), /tensor "a": unknown dtype nothing/);
  });
  it('bad shapes', async () => {
    await expectInvalid(buildFile({ ...twoTensors, b: { ...twoTensors.b, shape: '2x2' } }, data16), /tensor "b": shape must be an array/);
    await expectInvalid(buildFile({ ...twoTensors, b: { ...twoTensors.b, shape: [2, -2] } }, data16), /tensor "b": shape\[1\] must be a non-negative integer, got -2/);
    await expectInvalid(buildFile({ ...twoTensors, b: { ...twoTensors.b, shape: [1.5] } }, data16), /shape\[0\] must be a non-negative integer, got 1.5/);
    await expectInvalid(
      buildFile({ ...twoTensors, b: { ...twoTensors.b, shape: [2 ** 40, 2 ** 40] } }, data16),
      /has too many elements/,
    );
  });
  it('bad data_offsets', async () => {
    await expectInvalid(buildFile({ ...twoTensors, a: { ...twoTensors.a, data_offsets: [0] } }, data16), /tensor "a": data_offsets must be \[begin, end\]/);
    await expectInvalid(buildFile({ ...twoTensors, a: { ...twoTensors.a, data_offsets: [0, '8'] } }, data16), /data_offsets must be/);
    await expectInvalid(buildFile({ ...twoTensors, a: { ...twoTensors.a, data_offsets: [8, 0] } }, data16), /data_offsets \[8, 0\] has begin > end/);
  });
  it('size that does not match shape × dtype', async () => {
    await expectInvalid(
      buildFile({ ...twoTensors, a: { ...twoTensors.a, shape: [3] } }, data16),
      /tensor "a": data_offsets \[0, 8\] span 8 bytes but shape \[3\] of F32 \(4 bytes each\) needs 12 bytes/,
    );
  });
  it('range beyond the data section', async () => {
    await expectInvalid(buildFile(twoTensors, new Uint8Array(12)), /tensor "b": data_offsets \[8, 16\] go beyond the data section, which is 12 bytes/);
  });
  it('overlapping ranges, in either mode', async () => {
    const overlapping = { ...twoTensors, b: { ...twoTensors.b, data_offsets: [4, 12] } };
    await expectInvalid(buildFile(overlapping, data16), /tensor "b" .* overlaps tensor "a"/, { strict: false });
  });
  it('holes and trailing bytes in strict mode, accepted with strict: false', async () => {
    const holed = { ...twoTensors, b: { ...twoTensors.b, data_offsets: [12, 20] } };
    await expectInvalid(buildFile(holed, new Uint8Array(20)), /hole: bytes 8\.\.12 after tensor "a"/);
    await expectInvalid(buildFile(twoTensors, new Uint8Array(20)), /4 trailing bytes/);
    const late = { a: { ...twoTensors.a, data_offsets: [4, 12] } };
    await expectInvalid(buildFile(late, new Uint8Array(12)), /bytes 0\.\.4 at the start of the data section/);

    const data = new Uint8Array(24);
    data.set([1, 2, 3, 4, 5, 6, 7, 8], 12);
    const path = await writeRaw(buildFile(holed, data));
    const file = await SafetensorsFile.open(path, { strict: false });
    expect([...(await file.read('b')).data]).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    await file.close();
  });
  it('header key order is not significant (tensors are checked in offset order)', async () => {
    const reversed = { b: twoTensors.b, a: twoTensors.a };
    const path = await writeRaw(buildFile(reversed, data16));
    const file = await SafetensorsFile.open(path);
    expect([...file.tensors.keys()]).toEqual(['b', 'a']);
    await file.close();
  });
  it('metadata values must be strings', async () => {
    await expectInvalid(buildFile({ __metadata__: { format: 'pt', step: 3 }, ...twoTensors }, data16), /"__metadata__"."step" must be a string, got 3/);
    await expectInvalid(buildFile({ __metadata__: ['pt'], ...twoTensors }, data16), /"__metadata__" must be an object of strings/);
  });
  it('truncated files', async () => {
    const path = nextPath();
    await writeSafetensors(path, twoTensorsRaw());
    const full = await readFile(path);
    await expectInvalid(full.subarray(0, full.length - 3), /go beyond the data section/);
    await expectInvalid(full.subarray(0, 20), /goes beyond the end of the file/);
    await expectInvalid(full.subarray(0, 6), /shorter than the 8-byte/);
  });
  it('a file truncated after opening fails the read, not the process', async () => {
    const path = nextPath();
    await writeSafetensors(path, twoTensorsRaw());
    const file = await SafetensorsFile.open(path);
    await truncate(path, file.fileSize - 4);
    await expect(file.read('b')).rejects.toThrow(/file ended after \d+ of 8 bytes of tensor "b"/);
    await file.close();
  });
});

function twoTensorsRaw(): Record<string, RawTensor> {
  return {
    a: fromFloat32(new Float32Array([1, 2]), [2], 'F32'),
    b: { dtype: 'I16', shape: [2, 2], data: new Uint8Array([1, 0, 2, 0, 3, 0, 4, 0]) },
  };
}

describe('fuzz', () => {
  it('survives 200 random byte flips and truncations: parse or RedflagError, never a crash', async () => {
    const path = nextPath();
    await writeSafetensors(path, { ...twoTensorsRaw(), c: fromFloat32(new Float32Array([0.5, 0.25, 1]), [3], 'BF16') }, { metadata: { format: 'pt' } });
    const original = new Uint8Array(await readFile(path));
    let seed = 0x5eed;
    const random = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return seed % n;
    };
    let parsed = 0;
    let rejected = 0;
    for (let round = 0; round < 200; round++) {
      let bytes = original.slice();
      const flips = 1 + random(4);
      for (let i = 0; i < flips; i++) {
        // Most flips land in the header, where the parser does its work.
        const at = random(4) === 0 ? random(bytes.length) : random(Math.min(bytes.length, 8 + 120));
        bytes[at] = random(256);
      }
      if (random(3) === 0) bytes = bytes.subarray(0, random(bytes.length + 1));
      const target = join(dir, `fuzz-${round}.safetensors`);
      await writeFile(target, bytes);
      for (const strict of [true, false]) {
        try {
          const file = await SafetensorsFile.open(target, { strict });
          for (const name of file.tensors.keys()) {
            const tensor = await file.read(name);
            if (['F32', 'F16', 'BF16', 'F64'].includes(tensor.dtype)) toFloat32(tensor);
          }
          await file.close();
          parsed++;
        } catch (error) {
          if (!(error instanceof RedflagError)) throw new Error(`round ${round}: non-RedflagError ${String(error)}`);
          rejected++;
        }
      }
    }
    expect(parsed + rejected).toBe(400);
    expect(rejected).toBeGreaterThan(0);
  });
});
