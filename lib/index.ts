/**
 * redflag: turn a language model into its own harmfulness detector with a special
 * red-flag token. This module is the public API.
 * @module
 */
export { RedflagError, type RedflagErrorCode } from './errors.js';
export { loadModel, Model, Sequence, type LoadModelOptions, type LogitsOptions } from './model/model.js';
export type { GenerateOptions, GeneratedToken } from './model/generate.js';
export type { ModelConfig, GenerationConfig, RopeScaling, Architecture } from './model/config.js';
export { loadModelConfig, parseModelConfig, loadGenerationConfig, mergeEosTokenIds } from './model/config.js';
export {
  Tokenizer,
  IncrementalDecoder,
  type AddedTokenEntry,
  type DecodeOptions,
  type ChatMessage,
  type ChatTemplateOptions,
  type EncodeOptions,
} from './model/tokenizer.js';
export { addRedFlagToken, type AddRedFlagTokenOptions, type RedFlagInit, type RedFlagTokenInfo } from './model/red-flag.js';
export { RED_FLAG_TOKEN } from './model/red-flag-token.js';
export {
  SafetensorsFile,
  writeSafetensors,
  toFloat32,
  fromFloat32,
  type RawTensor,
  type TensorInfo,
  type SafetensorsDType,
  type WriteSafetensorsOptions,
  type SafetensorsOpenOptions,
  dtypeSize,
} from './model/safetensors.js';
export { WeightStore, type WeightInfo, type WeightStoreOptions } from './model/weights.js';
export { writeRandomModel, type RandomModelSpec } from './model/random-model.js';
export { createRng, sampleToken, argmax, type SamplingOptions } from './model/sampling.js';
