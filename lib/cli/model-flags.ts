/** The engine flags several commands share (--device, --dtype, --threads) and what loadModel takes from them. */
import { InvalidArgumentError } from 'commander';

import { parseDevice, type DeviceSpec } from '../model/device.js';
import type { LoadModelOptions } from '../model/model.js';

export interface EngineFlags {
  device: DeviceSpec;
  dtype?: 'f32' | 'bf16';
  threads?: number;
}

/** commander's parser of --device: `cpu`, `cuda` or `cuda:N`. */
export function device(value: string): DeviceSpec {
  try {
    return parseDevice(value, 'device').name as DeviceSpec;
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
}

/** loadModel's options from the engine flags (dtype left to the device's default when not given). */
export function modelOptions(flags: EngineFlags): LoadModelOptions {
  return { device: flags.device, ...(flags.dtype ? { dtype: flags.dtype } : {}), ...(flags.threads ? { threads: flags.threads } : {}) };
}
