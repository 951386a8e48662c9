/** The engine flags several commands share (--device, --dtype, --threads, --chat-template-kwargs) and what loadModel takes from them. */
import { InvalidArgumentError } from 'commander';

import { parseDevice, type DeviceSpec } from '../model/device.js';
import type { LoadModelOptions } from '../model/model.js';
import { checkChatTemplateKwargs } from '../model/tokenizer.js';

export interface EngineFlags {
  device: DeviceSpec;
  dtype?: 'f32' | 'bf16';
  threads?: number;
  chatTemplateKwargs?: Record<string, unknown>;
}

/** The help of --chat-template-kwargs. */
export const CHAT_TEMPLATE_KWARGS_HELP = 'variables for the chat template as a JSON object, e.g. \'{"enable_thinking": false}\' for Qwen3';

/** commander's parser of --chat-template-kwargs: a JSON object. */
export function templateKwargs(value: string): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(value);
  } catch (error) {
    throw new InvalidArgumentError(`not JSON (${(error as Error).message})`);
  }
  try {
    return checkChatTemplateKwargs(parsed, 'the kwargs');
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
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
  return {
    device: flags.device,
    ...(flags.dtype ? { dtype: flags.dtype } : {}),
    ...(flags.threads ? { threads: flags.threads } : {}),
    ...(flags.chatTemplateKwargs ? { chatTemplateKwargs: flags.chatTemplateKwargs } : {}),
  };
}
