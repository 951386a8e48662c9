/**
 * Where a model runs: `cpu` (the default) or an NVIDIA GPU, `cuda` (device 0) or `cuda:N`.
 * The CUDA engine lives in the CUDA build of the addon (`npm run build:cuda`); asking for it
 * where it cannot run fails here, before any weight is read, with one error that says which of
 * the build, the driver or the device is missing.
 * @module
 */
import { RedflagError } from '../errors.js';
import { loadNative, type NativeAddon } from '../native.js';

/** A device as the options and the CLI spell it: `cpu`, `cuda` or `cuda:N`. */
export type DeviceSpec = 'cpu' | 'cuda' | `cuda:${number}`;

/** A parsed device: the engine's index is -1 for the CPU. */
export interface Device {
  kind: 'cpu' | 'cuda';
  /** CUDA device ordinal; -1 for the CPU. */
  index: number;
  /** As the user wrote it, normalised: `cpu` or `cuda:N`. */
  name: string;
}

export const CPU: Device = { kind: 'cpu', index: -1, name: 'cpu' };

/** Parses `cpu`, `cuda` or `cuda:N`; `field` names the option in the error. */
export function parseDevice(value: unknown, field = 'device'): Device {
  if (value === undefined || value === 'cpu') return CPU;
  const m = typeof value === 'string' ? /^cuda(?::(\d{1,3}))?$/.exec(value) : null;
  if (!m) throw new RedflagError('INVALID_ARGUMENT', `${field} must be 'cpu', 'cuda' or 'cuda:N' (N a device number), got ${JSON.stringify(value)}`);
  const index = m[1] === undefined ? 0 : Number(m[1]);
  return { kind: 'cuda', index, name: `cuda:${index}` };
}

/**
 * The addon that runs `device`, checked: for the CPU the default addon; for CUDA the CUDA build,
 * which must have been compiled with nvcc and must see a usable GPU with that ordinal.
 */
export function addonFor(device: Device): NativeAddon {
  if (device.kind === 'cpu') return loadNative();
  const addon = loadNative('cuda');
  // A process keeps its GPUs and its build: each device is checked once.
  if (!checkedDevices.has(device.index)) {
    checkCudaAddon(addon, device);
    checkedDevices.add(device.index);
  }
  return addon;
}

const checkedDevices = new Set<number>();

/** The checks of {@link addonFor} on a loaded CUDA build. @internal */
export function checkCudaAddon(addon: NativeAddon, device: Device): NativeAddon {
  if (!addon.cudaInfo) {
    throw new RedflagError('NATIVE', `device '${device.name}': the CUDA build of the addon was compiled without CUDA (nvcc was not found when \`npm run build:cuda\` ran); rebuild it on a machine with the CUDA toolkit`);
  }
  const info = addon.cudaInfo(device.index);
  if (info.cublasLt === false) {
    throw new RedflagError('NATIVE', `device '${device.name}': the CUDA build of the addon has no CUDA engine: cuBLASLt, which it needs, was not found when \`npm run build:cuda\` ran; rebuild it where the CUDA toolkit has cuBLAS, or name a folder with include/cublasLt.h and lib/libcublasLt.so* (\`npm run build:cuda -- --CDRF_CUBLASLT_ROOT=DIR\`)`);
  }
  if (info.count === 0) {
    throw new RedflagError('NATIVE', `device '${device.name}': no usable CUDA device (${info.error || 'the runtime reports none'}): a missing or too old NVIDIA driver, or no GPU on this machine`);
  }
  if (device.index >= info.count) {
    throw new RedflagError('INVALID_ARGUMENT', `device '${device.name}': only ${info.count} CUDA device${info.count === 1 ? '' : 's'} visible (cuda:0${info.count > 1 ? `..cuda:${info.count - 1}` : ''})`);
  }
  if (info.unsupported) throw new RedflagError('UNSUPPORTED', `device '${device.name}': ${info.unsupported}`);
  return addon;
}

/** A size for a message, as the native side writes them: KiB below a MiB, MiB below a GiB. */
const sizeText = (bytes: number) =>
  bytes < 2 ** 20 ? `${(bytes / 2 ** 10).toFixed(1)} KiB` : bytes < 2 ** 30 ? `${(bytes / 2 ** 20).toFixed(1)} MiB` : `${(bytes / 2 ** 30).toFixed(2)} GiB`;

/**
 * Fails with OUT_OF_MEMORY when `device` (a GPU) has less than `bytes` free for `what`, before
 * any of it is read or allocated: a model that cannot fit says so at once, with the sizes, instead
 * of after reading gigabytes of weights. The CPU is not checked (the OS pages).
 */
export function checkDeviceRoom(addon: NativeAddon, device: Device, bytes: number, what: string, file?: string): void {
  if (device.kind !== 'cuda' || !addon.cudaMemory) return;
  const m = addon.cudaMemory(device.index);
  if (m.total === 0 || bytes <= m.free) return;
  const limit = m.limit ? ` (redflag holds ${sizeText(m.held)} of the ${sizeText(m.limit)} it may use)` : '';
  throw new RedflagError('OUT_OF_MEMORY', `${what} need ${sizeText(bytes)} on ${device.name}, which has ${sizeText(m.free)} free of ${sizeText(m.total)}${limit}`, {
    ...(file ? { file } : {}),
  });
}
