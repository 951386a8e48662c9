/**
 * redflag: turn a language model into its own harmfulness detector with a special
 * red-flag token. This module is the public API.
 * @module
 */
export { RedflagError, type RedflagErrorCode } from './errors.js';
export { loadModel, Model, Sequence, checkPickOptions, type LoadModelOptions, type LogitsOptions, type PickOptions, type StepResult } from './model/model.js';
export { parseDevice, type Device, type DeviceSpec } from './model/device.js';
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
export { RED_FLAG_TOKEN, categoryFlagToken, flagCategoryName, flagTokenCategory, type CategoryFlag } from './model/red-flag-token.js';
export {
  SafetensorsFile,
  writeSafetensors,
  toFloat32,
  fromFloat32,
  type DeferredTensor,
  type RawTensor,
  type TensorInfo,
  type SafetensorsDType,
  type WriteSafetensorsOptions,
  type SafetensorsOpenOptions,
  dtypeSize,
} from './model/safetensors.js';
export { WeightStore, type WeightInfo, type WeightStoreOptions } from './model/weights.js';
export { writeRandomModel, type RandomModelSpec } from './model/random-model.js';
export { createRng } from './model/sampling.js';

// Training: data, the trainer, adapters.
export {
  loadConversations,
  loadConversationFiles,
  streamConversations,
  detectFormat,
  type LoadOptions,
  type LoadResult,
  type DataFormat,
  type LoadedConversations,
  type FileEntry,
  type StreamOptions,
} from './data/loaders.js';
export type { Conversation, Message, Label, Role, SkippedRow } from './data/records.js';
export { encodeConversation, insertRedFlag, type EncodedConversation, type RedFlagEncoded, type EncodeConversationOptions, type PromptTemplate } from './data/encode.js';
export { BatchSampler, type Batch, type BatchSamplerOptions, type BatchReport, type LabelledExample } from './data/batches.js';
export { generateSyntheticData, withRefusals, SYNTHETIC_CATEGORIES, type SyntheticOptions, type SyntheticData, type SyntheticCategory } from './data/synthetic.js';
export { train, type TrainHooks, type TrainResult, type StepInfo } from './train/trainer.js';
export { parseTrainConfig, loadTrainConfig, learningRate, trainConfigSchema, type TrainConfig, type TrainConfigInput } from './train/config.js';
export { evaluateRedFlag, type EvalResult, type ScoredExample } from './train/evaluate.js';
export {
  saveAdapter,
  loadAdapter,
  loraScale,
  moduleLora,
  selectModules,
  peftModuleName,
  validateAdapter,
  loraSites,
  type Adapter,
  type LoraModuleWeights,
  type RedFlagRows,
  type LoraSite,
} from './train/adapter.js';
export { mergeAdapterTensors, planAdapterMerge, type MergePlan, type TensorShape } from './train/merge.js';
export type { WeightPlan, EngineTensor } from './model/weights-map.js';
export { applyAdapter, mergeAdapterInto, saveMerged, type ApplyAdapterOptions } from './train/export.js';
export { runPipeline, trainLanguageModel, PIPELINE_SIZES, type PipelineOptions, type PipelineResult, type PipelineSize } from './train/pipeline.js';
export { trainCategoryFlags, confusionMatrix, formatConfusion, type ConfusionMatrix, type CategoryFlagsResult } from './train/category-flags.js';
export * from './study/index.js';

// Production detection: generation with red-flag scores, continuous batching, classification.
export { createDetector, DEFAULT_REFLECTION } from './detect/detector.js';
export type {
  Detector,
  DetectorOptions,
  DetectorMode,
  Reflection,
  DetectGenerateOptions,
  DetectedToken,
  DetectionStream,
  DetectionSummary,
  FinishReason,
  ClassifyInput,
  ClassifyOptions,
  ClassifyResult,
  DetectorStats,
} from './detect/types.js';

// The OpenAI-compatible HTTP server.
export { buildServer, createServer, type DrainResult, type RedflagServer, type ServerOptions, type ServerState } from './server/app.js';
export { serve, type ServeOptions, type RunningServer } from './server/serve.js';

// Evaluation: detection statistics, attacks, utility, the report.
export { evaluate, loadEvalData, type EvalProgress, type EvaluateHooks } from './eval/evaluate.js';
export { parseEvalConfig, evalConfigSchema, type EvalConfig, type EvalConfigInput } from './eval/config.js';
export {
  auroc,
  auprc,
  rocCurve,
  tprAtFpr,
  chooseThreshold,
  rateAtThreshold,
  bootstrap,
  bootstrapTwoSample,
  rateEstimate,
  devTestSplit,
  type Estimate,
  type RocPoint,
  type BootstrapOptions,
} from './eval/stats.js';
export { DEFAULT_REFUSAL_PHRASES, RefusalMatcher, isRefusal, nonRefusalJudge, syntheticJudge, type Judge } from './eval/refusal.js';
export { generateSyntheticMcq, loadMcQuestions, type McQuestion } from './eval/mcq.js';
export { formatTable, type EvalReport, type ReportTable } from './eval/report.js';
export { DEFAULT_SUITES, SUITE_NAMES, type AttackBudgets, type Suite, type SuiteContext, type SuiteName, type EvalSettings, type LoadedVariant, type EvalData } from './eval/types.js';
export { DEFAULT_ATTACK_BUDGETS } from './eval/suites/white-box.js';
export { judgeSyntheticHarmful, matchSyntheticHarmfulTerms, syntheticHarmfulTerms } from './data/synthetic.js';
export { loadEvalFile, detectEvalFormat, type EvalFileResult, type EvalFormat, type StoredVerdict } from './data/formats.js';

// White-box attacks (the eval suites embedding, gcg and finetune run them).
export { AttackModel, type AttackLoss, type AttackTarget } from './attack/gradient-model.js';
export { embeddingAttack, type EmbeddingAttackOptions, type EmbeddingAttackResult } from './attack/embedding.js';
export { gcgAttack, type GcgOptions, type GcgResult } from './attack/gcg.js';
export { fineTuneAttack, type FineTuneAttackOptions } from './attack/finetune.js';
