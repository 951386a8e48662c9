/**
 * The trained adapter in memory, and its on-disk form: a Hugging Face PEFT LoRA adapter
 * directory that `peft.PeftModel.from_pretrained(base_model, dir)` (PEFT ≥ 0.15) loads as is.
 *
 * Files written by {@link saveAdapter}:
 * - `adapter_config.json`: a `LoraConfig` (peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
 *   lora_dropout, target_modules, use_rslora, fan_in_fan_out, …), with the `<rf>` rows declared in
 *   `trainable_token_indices`, plus a `redflag` block of our own metadata (PEFT ignores unknown
 *   keys with a "higher version of the library" warning; see `PeftConfigMixin.from_peft_type` in
 *   peft/config.py).
 * - `adapter_model.safetensors`: exactly the keys `get_peft_model_state_dict` would produce
 *   (see {@link peftLoraKey} and {@link peftTrainableTokensKey}), all F32.
 * - `redflag_rows.safetensors` (only with `<rf>` rows): the rows before training, which PEFT
 *   keeps only as a non-persistent buffer (`trainable_tokens_original`) and never saves.
 *
 * How the key formats were derived (huggingface/peft, checked against v0.15.0 and main):
 * - `utils/save_and_load.py` `get_peft_model_state_dict`: keys are the PeftModel's own parameter
 *   names (so they start with `base_model.model.`: PeftModel → LoraModel.model → the HF model),
 *   with the adapter name (`.default`) removed (`_remove_adapter_name_from_key`). Hence
 *   `base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight` for Llama-family models and
 *   `base_model.model.transformer.h.{L}.attn.c_attn.lora_A.weight` for GPT2LMHeadModel (its module
 *   is always `transformer`, even when a checkpoint stores names without that prefix).
 * - `tuners/lora/layer.py` `LoraLayer.update_layer`: `lora_A = nn.Linear(in_features, r)` so its
 *   weight is [r, in]; `lora_B = nn.Linear(r, out_features)` so [out, r]. For GPT-2's Conv1D
 *   (weight stored [in, out]) `tuners_utils._get_in_out_features` reads in/out from the weight
 *   shape, so A and B have the same [r, in] / [out, r] shapes; only the merge transposes B·A
 *   (`Linear.get_delta_weight`: `transpose(B @ A, fan_in_fan_out) * scaling`), which is why
 *   `fan_in_fan_out` must be true for GPT-2. Scaling is `lora_alpha / r`, or
 *   `lora_alpha / sqrt(r)` with `use_rslora`.
 * - `tuners/trainable_tokens/layer.py` `TrainableTokensLayer.update_layer`: despite its name,
 *   `trainable_tokens_delta[adapter]` holds the full replacement rows (initialised to
 *   `weight[token_indices]`, written with `index_copy`), shape [n_tokens, H], not a difference.
 * - `utils/other.py` `TrainableTokensWrapper.adapter_state_dict`: the saved key is
 *   `{wrapper module name}.token_adapter.trainable_tokens_delta`, e.g.
 *   `base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta`; a wrapper tied to
 *   another adapter (the LM head of a tied model) saves nothing. An untied LM head listed in
 *   `trainable_token_indices` gets its own `base_model.model.lm_head.token_adapter.trainable_tokens_delta`.
 * - `trainable_token_indices` (LoraConfig, PEFT ≥ 0.15) is a list (the input embedding) or a dict
 *   `{module name suffix: [ids]}`; we always write the dict: `{"embed_tokens": [ids]}` (GPT-2:
 *   `{"wte": [ids]}`), plus `"lm_head": [ids]` when the head is untied; `ids` is `<rf>`'s, then
 *   the category flags' (named in the `redflag` block's `categories`), and the delta tensors hold
 *   one row per id in that order. For tied models PEFT ties the
 *   LM head to the embedding's token adapter itself (`set_additional_trainable_modules`: a
 *   PeftModel method in v0.15 peft_model.py, a function in utils/other.py on main), so the head
 *   needs no entry and no tensor.
 * - `utils/constants.py` `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`: PEFT's default
 *   targets are `["q_proj", "v_proj"]` for llama/mistral/qwen2/qwen3 and `["c_attn"]` for gpt2
 *   ({@link DEFAULT_LORA_TARGETS}). A target matches a module whose name equals it or ends with
 *   `.` + target (`check_target_module_exists`).
 *
 * @module
 */
import { mkdir, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';

import { RedflagError } from '../errors.js';
import { readJsonFile, type ModelConfig } from '../model/config.js';
import { CATEGORY_NAME, RED_FLAG_TOKEN, type CategoryFlag } from '../model/red-flag-token.js';
import { checkChatTemplateKwargs } from '../model/tokenizer.js';
import {
  SafetensorsFile,
  fromFloat32,
  toFloat32,
  writeFileAtomic,
  writeSafetensors,
  type RawTensor,
  type TensorInfo,
} from '../model/safetensors.js';

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

/** The LoRA factors of one adapted linear layer, in PEFT's layout. */
export interface LoraModuleWeights {
  /** Decoder layer index, 0-based. */
  layer: number;
  /**
   * HF module path inside the block: `self_attn.q_proj` … `mlp.down_proj` (Llama family) or
   * `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` (GPT-2). See {@link loraSites}.
   */
  site: string;
  /** Input width of the layer (Linear `in_features`; GPT-2 Conv1D: first weight dim). */
  inFeatures: number;
  /** Output width of the layer. */
  outFeatures: number;
  /** `lora_A.weight`, [rank, inFeatures] row-major (the module's rank: {@link moduleLora}). */
  A: Float32Array;
  /** `lora_B.weight`, [outFeatures, rank] row-major. */
  B: Float32Array;
}

/**
 * The trained rows of the red-flag token `<rf>` and of the category flags `<rf:NAME>` after it:
 * K = 1 + categories.length rows, in that order, each matrix [K × hiddenSize].
 */
export interface RedFlagRows {
  /** The `<rf>` token's id (its row in the embedding and LM head). */
  tokenId: number;
  /** The category flags, in row order after `<rf>` (empty for one flag). */
  categories: CategoryFlag[];
  /** Trained input-embedding rows, [K × hiddenSize]. */
  embed: Float32Array;
  /** Trained LM-head rows, [K × hiddenSize]; null when the head is tied to the embedding. */
  head: Float32Array | null;
  /** The embedding rows before training, [K × hiddenSize]. */
  baseEmbed: Float32Array;
  /** The LM-head rows before training, [K × hiddenSize]; null when tied. */
  baseHead: Float32Array | null;
}

/** A LoRA adapter plus the `<rf>` rows, as trained. */
export interface Adapter {
  /** LoRA rank r. */
  rank: number;
  /** LoRA alpha (scale numerator). */
  alpha: number;
  /** Dropout probability used in training (recorded; no effect on inference). */
  dropout: number;
  /** Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r. */
  rslora: boolean;
  /**
   * PEFT `target_modules`: a list, each a site (`self_attn.q_proj`) or a dotted suffix of one
   * (`q_proj`; GPT-2 `c_proj` means both `attn.c_proj` and `mlp.c_proj`), or one regular
   * expression (Python's syntax) that a module's whole name ({@link peftModuleName}) must match;
   * `"all-linear"` is every adaptable layer.
   */
  targets: string[] | string;
  /** PEFT `exclude_modules`, in the same two forms: the modules it names are not adapted. */
  exclude?: string[] | string;
  /**
   * PEFT `rank_pattern`: `{ key: rank }` for the modules whose rank is not {@link Adapter.rank}. A
   * key is a regular expression matched against the end of a module's name, after a dot or
   * from its start (PEFT's `get_pattern_key`); the first key that matches wins.
   */
  rankPattern?: Record<string, number>;
  /** PEFT `alpha_pattern`: the same for alpha. */
  alphaPattern?: Record<string, number>;
  /** One entry per adapted (layer, site). */
  modules: LoraModuleWeights[];
  /** The `<rf>` rows, or null when the adapter does not train them. */
  redFlag: RedFlagRows | null;
  /** `base_model_name_or_path` (a hub id or directory); may be empty. */
  baseModel: string;
  /** The base model's configuration. */
  config: ModelConfig;
  /**
   * The chat-template kwargs the adapter was trained with (`redflag.chat_template_kwargs`), which
   * {@link applyAdapter} gives the tokenizer: an adapter trained on Qwen3 without thinking is
   * served without thinking.
   */
  chatTemplateKwargs?: Record<string, unknown>;
}

/** One LoRA-adaptable linear layer of a decoder block. */
export interface LoraSite {
  /** HF module path inside the block, e.g. `self_attn.q_proj` or `attn.c_attn`. */
  site: string;
  /** Input width. */
  inFeatures: number;
  /** Output width. */
  outFeatures: number;
  /** True for GPT-2 Conv1D layers, whose HF weight is stored [in, out]. */
  conv1d: boolean;
}

/** File names inside an adapter directory. */
export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
/** PEFT's weights file name (`SAFETENSORS_WEIGHTS_NAME`). */
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
/** Our sidecar holding the `<rf>` rows before training. */
export const RED_FLAG_ROWS_FILE = 'redflag_rows.safetensors';

/** PEFT's default LoRA targets per architecture (peft/utils/constants.py). */
export const DEFAULT_LORA_TARGETS: Readonly<Record<ModelConfig['architecture'], readonly string[]>> = {
  llama: ['q_proj', 'v_proj'],
  mistral: ['q_proj', 'v_proj'],
  qwen2: ['q_proj', 'v_proj'],
  qwen3: ['q_proj', 'v_proj'],
  gpt2: ['c_attn'],
};

/** Version of the `redflag` block in adapter_config.json. */
const REDFLAG_FORMAT_VERSION = 1;

// ---------------------------------------------------------------------------------------------
// Names and shapes
// ---------------------------------------------------------------------------------------------

/** The adaptable linear layers of one decoder block of this model, with their widths. */
export function loraSites(config: ModelConfig): LoraSite[] {
  const H = config.hiddenSize, I = config.intermediateSize;
  if (config.architecture === 'gpt2') {
    const s = (site: string, inFeatures: number, outFeatures: number): LoraSite => ({ site, inFeatures, outFeatures, conv1d: true });
    return [s('attn.c_attn', H, 3 * H), s('attn.c_proj', H, H), s('mlp.c_fc', H, I), s('mlp.c_proj', I, H)];
  }
  const q = config.numHeads * config.headDim, kv = config.numKvHeads * config.headDim;
  const s = (site: string, inFeatures: number, outFeatures: number): LoraSite => ({ site, inFeatures, outFeatures, conv1d: false });
  return [
    s('self_attn.q_proj', H, q),
    s('self_attn.k_proj', H, kv),
    s('self_attn.v_proj', H, kv),
    s('self_attn.o_proj', q, H),
    s('mlp.gate_proj', H, I),
    s('mlp.up_proj', H, I),
    s('mlp.down_proj', I, H),
  ];
}

/**
 * A block module's name in the Hugging Face model, the name PEFT matches target_modules,
 * exclude_modules, rank_pattern and alpha_pattern against: `model.layers.3.self_attn.q_proj`
 * (GPT-2: `transformer.h.3.attn.c_attn`).
 */
export function peftModuleName(config: ModelConfig, layer: number, site: string): string {
  return config.architecture === 'gpt2' ? `transformer.h.${layer}.${site}` : `model.layers.${layer}.${site}`;
}

/** The HF module name of a block site, as PEFT sees it inside the PeftModel. */
function peftModulePath(config: ModelConfig, layer: number, site: string): string {
  return `base_model.model.${peftModuleName(config, layer, site)}`;
}

// PEFT's module selection and per-module ranks (tuners_utils.check_target_module_exists and
// utils/other.get_pattern_key), on the names above. Its patterns are Python regular
// expressions: named groups are spelt differently in JavaScript, and \A \Z are ^ $; the rest
// that module patterns use (classes, groups, alternation, \d, \.) means the same in both.

/** A Python `re` pattern as a JavaScript RegExp source; `fail` names the field it came from. */
function pythonPattern(pattern: string, fail: (message: string, code?: 'INVALID_FILE' | 'UNSUPPORTED') => RedflagError): string {
  if (/\(\?[aiLmsux-]+[:)]/.test(pattern)) throw fail(`is ${show(pattern)}, whose inline flags redflag does not support`, 'UNSUPPORTED');
  const source = pattern.replace(/\(\?P</g, '(?<').replace(/\(\?P=(\w+)\)/g, '\\k<$1>').replace(/\\A/g, '^').replace(/\\Z/g, '$');
  try {
    new RegExp(source);
  } catch (error) {
    throw fail(`is ${show(pattern)}, not a regular expression redflag can read (${(error as Error).message})`);
  }
  return source;
}

/** Python's `re.fullmatch(pattern, name)`, for a source from {@link pythonPattern}. */
const fullMatch = (source: string, name: string): boolean => new RegExp(`^(?:${source})$`).test(name);

/** Whether PEFT's `target_modules` or `exclude_modules` (a list or a pattern) names the module `name`. */
function namesModule(spec: readonly string[] | string, name: string): boolean {
  if (typeof spec === 'string') return spec === 'all-linear' || fullMatch(pythonPattern(spec, (m) => new RedflagError('INVALID_ARGUMENT', `adapter: pattern ${m}`)), name);
  return spec.some((t) => name === t || name.endsWith(`.${t}`));
}

/**
 * Checks a PEFT `target_modules` or `exclude_modules` list (`what`): non-empty, its entries
 * non-empty strings without repeats, each naming a module of this model (PEFT's rule: the whole
 * name, or its end after a dot). `fail` makes the error.
 */
function checkModuleList(config: ModelConfig, list: unknown, what: string, fail: (message: string) => RedflagError): string[] {
  if (!Array.isArray(list) || list.length === 0) throw fail(`${what} must be a non-empty list of module names or a pattern, got ${show(list)}`);
  const seen = new Set<string>();
  for (const entry of list) {
    if (typeof entry !== 'string' || entry === '') throw fail(`${what} entries must be non-empty strings, got ${show(entry)}`);
    if (seen.has(entry)) throw fail(`${what} lists "${entry}" twice`);
    seen.add(entry);
    if (selectModules(config, [entry], null).length === 0) {
      throw fail(`${what} entry "${entry}" matches no adaptable layer of ${config.hfArchitecture} (layers: ${loraSites(config).map((s) => s.site).join(', ')})`);
    }
  }
  return [...(list as string[])];
}

/**
 * The block modules PEFT adapts, in layer then {@link loraSites} order: those `targets` names
 * (a list: its sites in `layers`, every layer when null; a pattern: every module whose whole name
 * matches it, `layers` must then be null), less those `exclude` names.
 */
export function selectModules(
  config: ModelConfig,
  targets: readonly string[] | string,
  layers: readonly number[] | null,
  exclude?: readonly string[] | string,
): Array<{ layer: number; site: string }> {
  const chosen = layers === null ? Array.from({ length: config.numLayers }, (_, i) => i) : [...layers];
  const out: Array<{ layer: number; site: string }> = [];
  for (const layer of chosen) {
    for (const { site } of loraSites(config)) {
      const name = peftModuleName(config, layer, site);
      if (namesModule(targets, name) && !(exclude !== undefined && namesModule(exclude, name))) out.push({ layer, site });
    }
  }
  return out;
}

/**
 * The value of PEFT's `rank_pattern` or `alpha_pattern` for the module `name`, with the key that
 * gave it: the first key matching the end of the name after a dot or from its start
 * (`re.match(rf"(.*\.)?({key})$", name)`), or undefined when none does.
 */
export function patternValue(pattern: Readonly<Record<string, number>> | undefined, name: string): { key: string; value: number } | undefined {
  for (const [key, value] of Object.entries(pattern ?? {})) {
    const source = pythonPattern(key, (m) => new RedflagError('INVALID_ARGUMENT', `adapter: pattern key ${m}`));
    if (new RegExp(`^(?:.*\\.)?(?:${source})$`).test(name)) return { key, value };
  }
  return undefined;
}

/** One module's LoRA rank, alpha and scale: the adapter's, or those its rank_pattern and alpha_pattern give the module. */
export function moduleLora(
  adapter: Pick<Adapter, 'rank' | 'alpha' | 'rslora' | 'rankPattern' | 'alphaPattern' | 'config'>,
  layer: number,
  site: string,
): { rank: number; alpha: number; scale: number } {
  const name = peftModuleName(adapter.config, layer, site);
  const rank = patternValue(adapter.rankPattern, name)?.value ?? adapter.rank;
  const alpha = patternValue(adapter.alphaPattern, name)?.value ?? adapter.alpha;
  return { rank, alpha, scale: loraScale({ rank, alpha, rslora: adapter.rslora }) };
}

/** The adapter_model.safetensors key of a LoRA factor, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. */
export function peftLoraKey(config: ModelConfig, layer: number, site: string, factor: 'A' | 'B'): string {
  return `${peftModulePath(config, layer, site)}.lora_${factor}.weight`;
}

/**
 * The adapter_model.safetensors key of the `<rf>` rows: the input embedding's
 * (`base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta`, GPT-2
 * `base_model.model.transformer.wte.…`) or an untied LM head's (`base_model.model.lm_head.…`).
 */
export function peftTrainableTokensKey(config: ModelConfig, which: 'embed' | 'head'): string {
  const module =
    which === 'head' ? 'base_model.model.lm_head' : config.architecture === 'gpt2' ? 'base_model.model.transformer.wte' : 'base_model.model.model.embed_tokens';
  return `${module}.token_adapter.trainable_tokens_delta`;
}

/** The `trainable_token_indices` module names PEFT matches (by suffix) for this architecture. */
function tokenModuleNames(config: ModelConfig): { embed: string[]; head: string[] } {
  return config.architecture === 'gpt2'
    ? { embed: ['wte', 'transformer.wte'], head: ['lm_head'] }
    : { embed: ['embed_tokens', 'model.embed_tokens'], head: ['lm_head'] };
}

/** `alpha / r`, or `alpha / sqrt(r)` with rsLoRA: the factor B·A is multiplied by (PEFT `LoraLayer.scaling`). */
export function loraScale(a: Pick<Adapter, 'rank' | 'alpha' | 'rslora'>): number {
  return a.rslora ? a.alpha / Math.sqrt(a.rank) : a.alpha / a.rank;
}

// ---------------------------------------------------------------------------------------------
// Validation of an in-memory adapter
// ---------------------------------------------------------------------------------------------

const isPositiveInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v > 0;
const isIndex = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/** Index of the first non-finite value, or -1. */
function firstNonFinite(values: Float32Array): number {
  for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i]!)) return i;
  return -1;
}

/**
 * Checks an in-memory adapter against its model config: hyperparameters, targets and patterns,
 * every module's layer, site, widths and factor sizes (at its rank: {@link moduleLora}), that it
 * holds exactly the modules its targets select (a list: every targeted site of each adapted
 * layer), and the `<rf>` rows. Throws INVALID_ARGUMENT naming the PEFT key that is wrong.
 * Returns the adapted layers (sorted).
 */
export function validateAdapter(adapter: Adapter): { layers: number[] } {
  const fail = (message: string): RedflagError => new RedflagError('INVALID_ARGUMENT', `adapter: ${message}`);
  if (typeof adapter !== 'object' || adapter === null) throw fail('must be an object');
  const config = adapter.config;
  if (typeof config !== 'object' || config === null) throw fail('config must be a ModelConfig');
  if (!isPositiveInt(adapter.rank)) throw fail(`rank must be a positive integer, got ${String(adapter.rank)}`);
  if (typeof adapter.alpha !== 'number' || !Number.isFinite(adapter.alpha) || adapter.alpha <= 0) {
    throw fail(`alpha must be a positive number, got ${String(adapter.alpha)}`);
  }
  if (typeof adapter.dropout !== 'number' || !(adapter.dropout >= 0 && adapter.dropout < 1)) {
    throw fail(`dropout must be in [0, 1), got ${String(adapter.dropout)}`);
  }
  if (typeof adapter.rslora !== 'boolean') throw fail('rslora must be a boolean');
  if (typeof adapter.baseModel !== 'string') throw fail('baseModel must be a string');
  const pattern = (what: string) => (m: string) => fail(`${what} ${m}`);
  if (typeof adapter.targets !== 'string') checkModuleList(config, adapter.targets, 'targets', fail);
  else if (adapter.targets !== 'all-linear') pythonPattern(adapter.targets, pattern('targets'));
  if (typeof adapter.exclude === 'string') pythonPattern(adapter.exclude, pattern('exclude'));
  else if (adapter.exclude !== undefined) checkModuleList(config, adapter.exclude, 'exclude', fail);
  for (const [what, values, integer] of [['rankPattern', adapter.rankPattern, true], ['alphaPattern', adapter.alphaPattern, false]] as const) {
    if (values === undefined) continue;
    if (!isPlainObject(values)) throw fail(`${what} must be an object of module patterns to values`);
    for (const [key, v] of Object.entries(values)) {
      pythonPattern(key, pattern(`${what} key`));
      if (!(integer ? isPositiveInt(v) : typeof v === 'number' && Number.isFinite(v) && v > 0)) throw fail(`${what}[${show(key)}] must be a positive ${integer ? 'integer' : 'number'}, got ${show(v)}`);
    }
  }
  const table = new Map(loraSites(config).map((s) => [s.site, s]));
  if (!Array.isArray(adapter.modules) || adapter.modules.length === 0) throw fail('has no LoRA modules');

  const present = new Set<string>();
  const layers = new Set<number>();
  for (const m of adapter.modules) {
    const key = (factor: 'A' | 'B'): string =>
      isIndex(m.layer) && typeof m.site === 'string' ? peftLoraKey(config, m.layer, m.site, factor) : `module ${JSON.stringify({ layer: m.layer, site: m.site })}`;
    if (!isIndex(m.layer) || m.layer >= config.numLayers) {
      throw fail(`${key('A')}: layer ${String(m.layer)} is out of range (the model has ${config.numLayers} layers)`);
    }
    const spec = table.get(m.site);
    if (spec === undefined) throw fail(`${key('A')}: "${String(m.site)}" is not an adaptable layer (known: ${[...table.keys()].join(', ')})`);
    const name = peftModuleName(config, m.layer, m.site);
    if (!namesModule(adapter.targets, name) || (adapter.exclude !== undefined && namesModule(adapter.exclude, name))) {
      throw fail(`${key('A')}: ${unselectedWhy({ targets: adapter.targets, exclude: adapter.exclude, layers: null }, config, m.layer, m.site)}`);
    }
    if (m.inFeatures !== spec.inFeatures || m.outFeatures !== spec.outFeatures) {
      throw fail(`${key('A')}: inFeatures × outFeatures is ${m.inFeatures} × ${m.outFeatures}, the model's ${m.site} is ${spec.inFeatures} × ${spec.outFeatures}`);
    }
    const id = `${m.layer}/${m.site}`;
    if (present.has(id)) throw fail(`${key('A')}: layer ${m.layer} ${m.site} appears twice`);
    present.add(id);
    layers.add(m.layer);
    const r = moduleLora(adapter, m.layer, m.site).rank;
    for (const [factor, values, size, shape] of [
      ['A', m.A, r * spec.inFeatures, `[${r}, ${spec.inFeatures}]`],
      ['B', m.B, spec.outFeatures * r, `[${spec.outFeatures}, ${r}]`],
    ] as const) {
      if (!(values instanceof Float32Array)) throw fail(`${key(factor)}: must be a Float32Array`);
      if (values.length !== size) throw fail(`${key(factor)}: has ${values.length} values, expected ${shape} = ${size} for rank ${r}`);
      const bad = firstNonFinite(values);
      if (bad >= 0) throw fail(`${key(factor)}: value ${bad} is not finite (${values[bad]})`);
    }
  }
  // PEFT adapts every module its targets select: with a list, every targeted site of every
  // adapted layer (layers_to_transform); with a pattern, every module whose name it matches.
  const sortedLayers = [...layers].sort((a, b) => a - b);
  const listed = typeof adapter.targets !== 'string';
  for (const { layer, site } of selectModules(config, adapter.targets, listed ? sortedLayers : null, adapter.exclude)) {
    if (!present.has(`${layer}/${site}`)) {
      throw fail(`${peftLoraKey(config, layer, site, 'A')} is missing: ${listed ? `layer ${layer} is adapted, so every targeted site must be` : `targets ${show(adapter.targets)} select it`}`);
    }
  }

  const rf = adapter.redFlag;
  if (rf !== null) {
    if (typeof rf !== 'object' || rf === undefined) throw fail('redFlag must be an object or null');
    // A new token appended to the vocabulary gets id vocabSize (the base model's row count).
    if (!isIndex(rf.tokenId) || rf.tokenId > config.vocabSize) {
      throw fail(`redFlag.tokenId must be a token id in [0, ${config.vocabSize}], got ${String(rf.tokenId)}`);
    }
    if (!Array.isArray(rf.categories)) throw fail('redFlag.categories must be an array');
    const ids = new Set([rf.tokenId]);
    for (const [i, c] of rf.categories.entries()) {
      if (typeof c?.category !== 'string' || !CATEGORY_NAME.test(c.category)) throw fail(`redFlag.categories[${i}].category must be a category name, got ${show(c?.category)}`);
      const rows = config.vocabSize + rf.categories.length + 1;
      if (!isIndex(c.id) || c.id >= rows) throw fail(`redFlag.categories[${i}].id must be a token id in [0, ${rows - 1}], got ${show(c.id)}`);
      if (ids.has(c.id)) throw fail(`redFlag.categories[${i}].id must be a token id not used by another flag, got ${show(c.id)}`);
      ids.add(c.id);
    }
    const H = config.hiddenSize * (1 + rf.categories.length);
    const tied = config.tieWordEmbeddings;
    const rows: Array<[string, Float32Array | null, boolean]> = [
      ['embed', rf.embed, true],
      ['baseEmbed', rf.baseEmbed, true],
      ['head', rf.head, !tied],
      ['baseHead', rf.baseHead, !tied],
    ];
    for (const [name, row, needed] of rows) {
      if (!needed) {
        if (row !== null) throw fail(`redFlag.${name} must be null: the model ties its LM head to the embedding`);
        continue;
      }
      if (!(row instanceof Float32Array)) throw fail(`redFlag.${name} must be a Float32Array${tied ? '' : ' (the LM head is untied)'}`);
      if (row.length !== H) throw fail(`redFlag.${name} has ${row.length} values, expected flags × hiddenSize = ${H}`);
      const bad = firstNonFinite(row);
      if (bad >= 0) throw fail(`redFlag.${name}: value ${bad} is not finite (${row[bad]})`);
    }
  }
  return { layers: sortedLayers };
}

// ---------------------------------------------------------------------------------------------
// Saving
// ---------------------------------------------------------------------------------------------

/** Node's error code of a failed system call, if any. */
function errorCode(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error ? String((error as { code: unknown }).code) : undefined;
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch (error) {
    if (errorCode(error) === 'ENOENT') return false;
    throw new RedflagError('INVALID_ARGUMENT', `cannot access (${errorCode(error) ?? String(error)})`, { file: path, cause: error });
  }
}

/** The adapter_config.json object for an adapter (keys sorted, as PEFT's `save_pretrained` writes them). */
function adapterConfigJson(adapter: Adapter, layers: readonly number[]): Record<string, unknown> {
  const config = adapter.config;
  const gpt2 = config.architecture === 'gpt2';
  // A pattern names the layers itself (PEFT refuses layers_to_transform beside one).
  const allLayers = layers.length === config.numLayers || typeof adapter.targets === 'string';
  const rf = adapter.redFlag;
  let trainableTokenIndices: Record<string, number[]> | null = null;
  if (rf !== null) {
    const names = tokenModuleNames(config);
    const ids = [rf.tokenId, ...rf.categories.map((c) => c.id)];
    trainableTokenIndices = { [names.embed[0]!]: ids };
    if (!config.tieWordEmbeddings) trainableTokenIndices[names.head[0]!] = [...ids];
  }
  const json: Record<string, unknown> = {
    alpha_pattern: { ...adapter.alphaPattern },
    auto_mapping: null,
    base_model_name_or_path: adapter.baseModel === '' ? null : adapter.baseModel,
    bias: 'none',
    exclude_modules: adapter.exclude === undefined ? null : typeof adapter.exclude === 'string' ? adapter.exclude : [...adapter.exclude],
    fan_in_fan_out: gpt2,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: allLayers ? null : gpt2 ? 'h' : 'layers',
    layers_to_transform: allLayers ? null : [...layers],
    lora_alpha: adapter.alpha,
    lora_bias: false,
    lora_dropout: adapter.dropout,
    modules_to_save: null,
    peft_type: 'LORA',
    r: adapter.rank,
    rank_pattern: { ...adapter.rankPattern },
    redflag: {
      format_version: REDFLAG_FORMAT_VERSION,
      architecture: config.hfArchitecture,
      token: rf === null ? null : RED_FLAG_TOKEN,
      token_id: rf === null ? null : rf.tokenId,
      tied: rf === null ? null : config.tieWordEmbeddings,
      base_rows_file: rf === null ? null : RED_FLAG_ROWS_FILE,
      // The category flags' names by token id, in row order after <rf>.
      ...(rf !== null && rf.categories.length > 0 ? { categories: Object.fromEntries(rf.categories.map((c) => [c.category, c.id])) } : {}),
      ...(adapter.chatTemplateKwargs !== undefined && Object.keys(adapter.chatTemplateKwargs).length > 0 ? { chat_template_kwargs: { ...adapter.chatTemplateKwargs } } : {}),
    },
    revision: null,
    target_modules: typeof adapter.targets === 'string' ? adapter.targets : [...adapter.targets],
    task_type: 'CAUSAL_LM',
    trainable_token_indices: trainableTokenIndices,
    use_dora: false,
    use_rslora: adapter.rslora,
  };
  return json;
}

/** A [K, H] F32 tensor holding K flag rows. */
const rowTensor = (rows: Float32Array, H: number): RawTensor => fromFloat32(rows, [rows.length / H, H], 'F32');

/**
 * Writes `adapter` to `dir` (created if needed) as a PEFT LoRA adapter: adapter_config.json,
 * adapter_model.safetensors and, with `<rf>` rows, redflag_rows.safetensors. The adapter is
 * validated first ({@link validateAdapter}). Each file is written atomically; without
 * `overwrite: true` nothing is written when any of them already exists. adapter_config.json
 * is written last, so a directory that has one is complete.
 */
export async function saveAdapter(dir: string, adapter: Adapter, options: { overwrite?: boolean } = {}): Promise<void> {
  const { layers } = validateAdapter(adapter);
  const overwrite = options.overwrite ?? false;
  const config = adapter.config;
  const configPath = join(dir, ADAPTER_CONFIG_FILE);
  const weightsPath = join(dir, ADAPTER_WEIGHTS_FILE);
  const rowsPath = join(dir, RED_FLAG_ROWS_FILE);
  const rf = adapter.redFlag;

  if (!overwrite) {
    for (const path of rf === null ? [configPath, weightsPath] : [configPath, weightsPath, rowsPath]) {
      if (await exists(path)) {
        throw new RedflagError('INVALID_ARGUMENT', 'refusing to overwrite an existing adapter file (pass overwrite: true to replace it)', { file: path });
      }
    }
  }
  try {
    await mkdir(dir, { recursive: true });
  } catch (error) {
    throw new RedflagError('INVALID_ARGUMENT', `cannot create the adapter directory (${errorCode(error) ?? String(error)})`, { file: dir, cause: error });
  }
  // adapter_config.json goes first and comes back last: a save stopped between leaves a folder
  // that is no adapter, never the new weights under the old config (its alpha, its rank).
  if (overwrite) await unlink(configPath).catch(() => undefined);

  const tensors = new Map<string, RawTensor>();
  for (const m of adapter.modules) {
    const r = moduleLora(adapter, m.layer, m.site).rank;
    tensors.set(peftLoraKey(config, m.layer, m.site, 'A'), fromFloat32(m.A, [r, m.inFeatures], 'F32'));
    tensors.set(peftLoraKey(config, m.layer, m.site, 'B'), fromFloat32(m.B, [m.outFeatures, r], 'F32'));
  }
  if (rf !== null) {
    tensors.set(peftTrainableTokensKey(config, 'embed'), rowTensor(rf.embed, config.hiddenSize));
    if (rf.head !== null) tensors.set(peftTrainableTokensKey(config, 'head'), rowTensor(rf.head, config.hiddenSize));
  }
  await writeSafetensors(weightsPath, tensors, { metadata: { format: 'pt' }, overwrite });

  if (rf !== null) {
    const base = new Map<string, RawTensor>([['base_embed', rowTensor(rf.baseEmbed, config.hiddenSize)]]);
    if (rf.baseHead !== null) base.set('base_head', rowTensor(rf.baseHead, config.hiddenSize));
    await writeSafetensors(rowsPath, base, { metadata: { format: 'pt', token_id: String(rf.tokenId) }, overwrite });
  } else if (overwrite) {
    // A sidecar left by an earlier save would describe rows this adapter does not have.
    await unlink(rowsPath).catch(() => undefined);
  }

  const text = `${JSON.stringify(adapterConfigJson(adapter, layers), null, 2)}\n`;
  await writeFileAtomic(configPath, [new TextEncoder().encode(text)], { overwrite });
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

const show = (value: unknown): string => {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
};

/** What loadAdapter learns from adapter_config.json. */
interface ParsedAdapterConfig {
  rank: number;
  alpha: number;
  dropout: number;
  rslora: boolean;
  targets: string[] | string;
  exclude: string[] | string | undefined;
  rankPattern: Record<string, number> | undefined;
  alphaPattern: Record<string, number> | undefined;
  /** layers_to_transform (sorted), or null for every layer. */
  layers: number[] | null;
  /** The modules the adapter must hold, by `layer/site`. */
  selected: Array<{ layer: number; site: string }>;
  baseModel: string;
  /** The `<rf>` token id, or null when the adapter has no trainable tokens. */
  tokenId: number | null;
  /** The category flags after `<rf>`. */
  categories: CategoryFlag[];
  baseRowsFile: string | null;
  chatTemplateKwargs: Record<string, unknown> | undefined;
}

/** Validates adapter_config.json against the model config. */
function parseAdapterConfig(raw: unknown, config: ModelConfig, file: string): ParsedAdapterConfig {
  const fail = (field: string, message: string, code: 'INVALID_FILE' | 'UNSUPPORTED' = 'INVALID_FILE'): RedflagError =>
    new RedflagError(code, `"${field}" ${message}`, { file });
  if (!isPlainObject(raw)) throw new RedflagError('INVALID_FILE', 'adapter_config.json must contain a JSON object', { file });
  const has = (key: string): boolean => raw[key] !== undefined && raw[key] !== null;

  if (raw['peft_type'] !== 'LORA') throw fail('peft_type', `is ${show(raw['peft_type'])}; only "LORA" adapters are supported`, 'UNSUPPORTED');
  if (has('task_type') && raw['task_type'] !== 'CAUSAL_LM') {
    throw fail('task_type', `is ${show(raw['task_type'])}; redflag adapters are "CAUSAL_LM"`, 'UNSUPPORTED');
  }
  const rank = raw['r'];
  if (!isPositiveInt(rank)) throw fail('r', `must be a positive integer, got ${show(rank)}`);
  const alpha = raw['lora_alpha'] ?? 8;
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0) throw fail('lora_alpha', `must be a positive number, got ${show(alpha)}`);
  const dropout = raw['lora_dropout'] ?? 0;
  if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1)) throw fail('lora_dropout', `must be a number in [0, 1), got ${show(dropout)}`);
  const rslora = raw['use_rslora'] ?? false;
  if (typeof rslora !== 'boolean') throw fail('use_rslora', `must be a boolean, got ${show(rslora)}`);

  const gpt2 = config.architecture === 'gpt2';
  if ((raw['fan_in_fan_out'] ?? false) !== gpt2) {
    throw fail('fan_in_fan_out', `is ${show(raw['fan_in_fan_out'])}, but ${config.hfArchitecture} needs ${gpt2} (${gpt2 ? 'Conv1D weights are [in, out]' : 'nn.Linear weights are [out, in]'})`);
  }
  if ((raw['bias'] ?? 'none') !== 'none') throw fail('bias', `is ${show(raw['bias'])}; only "none" is supported`, 'UNSUPPORTED');
  // Options that change the adapter's math or add weights we do not implement.
  for (const key of ['use_dora', 'lora_bias', 'use_qalora']) {
    if ((raw[key] ?? false) !== false) throw fail(key, `is ${show(raw[key])}, which is not supported`, 'UNSUPPORTED');
  }
  // Per-module ranks and alphas: { pattern key: value }.
  const perModule = (key: 'rank_pattern' | 'alpha_pattern'): Record<string, number> | undefined => {
    const value = raw[key];
    if (value === undefined || value === null) return undefined;
    if (!isPlainObject(value)) throw fail(key, `must be an object of module patterns to ${key === 'rank_pattern' ? 'ranks' : 'alphas'}, got ${show(value)}`);
    for (const [k, v] of Object.entries(value)) {
      pythonPattern(k, (m, code) => fail(key, `key ${m}`, code));
      const ok = key === 'rank_pattern' ? isPositiveInt(v) : typeof v === 'number' && Number.isFinite(v) && v > 0;
      if (!ok) throw fail(`${key}.${k}`, `must be a positive ${key === 'rank_pattern' ? 'integer' : 'number'}, got ${show(v)}`);
    }
    return Object.keys(value).length === 0 ? undefined : (value as Record<string, number>);
  };
  const rankPattern = perModule('rank_pattern');
  const alphaPattern = perModule('alpha_pattern');
  for (const key of ['modules_to_save', 'layer_replication', 'target_parameters', 'alora_invocation_tokens']) {
    const value = raw[key];
    if (value !== undefined && value !== null && !(Array.isArray(value) && value.length === 0)) {
      throw fail(key, `is ${show(value)}, which is not supported`, 'UNSUPPORTED');
    }
  }

  // target_modules and exclude_modules: a list of names, or one pattern (PEFT's two forms).
  const moduleSpec = (key: 'target_modules' | 'exclude_modules'): string[] | string => {
    const value = raw[key];
    if (typeof value !== 'string') return checkModuleList(config, value, key, (m) => new RedflagError('INVALID_FILE', m, { file }));
    if (!(value === 'all-linear' && key === 'target_modules')) pythonPattern(value, (m, code) => fail(key, m, code));
    return value;
  };
  const targets = moduleSpec('target_modules');
  const excludeRaw = raw['exclude_modules'];
  const exclude = excludeRaw === undefined || excludeRaw === null || (Array.isArray(excludeRaw) && excludeRaw.length === 0) ? undefined : moduleSpec('exclude_modules');

  let layers: number[] | null = null;
  const toTransform = raw['layers_to_transform'];
  if (toTransform !== undefined && toTransform !== null) {
    // PEFT refuses the pair too (LoraConfig.__post_init__): a pattern names whole modules, layers included.
    if (typeof targets === 'string') throw fail('layers_to_transform', `is ${show(toTransform)}, but target_modules is a pattern, which names the layers itself`);
    const list = typeof toTransform === 'number' ? [toTransform] : toTransform;
    if (!Array.isArray(list) || list.length === 0 || !list.every(isIndex)) {
      throw fail('layers_to_transform', `must be a layer index or a non-empty list of them, got ${show(toTransform)}`);
    }
    for (const layer of list) {
      if (layer >= config.numLayers) throw fail('layers_to_transform', `names layer ${layer}, but the model has ${config.numLayers} layers`);
    }
    layers = [...new Set(list)].sort((a, b) => a - b);
    const pattern = raw['layers_pattern'];
    const expected = gpt2 ? 'h' : 'layers';
    const patterns = pattern === undefined || pattern === null ? [expected] : Array.isArray(pattern) ? pattern : [pattern];
    if (!patterns.includes(expected)) throw fail('layers_pattern', `is ${show(pattern)}; ${config.hfArchitecture} blocks are under "${expected}"`);
  }

  const selected = selectModules(config, targets, layers, exclude);
  if (selected.length === 0) {
    throw fail('target_modules', `is ${show(targets)}${exclude === undefined ? '' : ` less exclude_modules ${show(exclude)}`}, which selects no adaptable layer of ${config.hfArchitecture} (module names like "${peftModuleName(config, 0, loraSites(config)[0]!.site)}")`);
  }

  const baseModel = raw['base_model_name_or_path'] ?? '';
  if (typeof baseModel !== 'string') throw fail('base_model_name_or_path', `must be a string or null, got ${show(baseModel)}`);

  const { tokenId, categories, baseRowsFile } = parseTrainableTokens(raw, config, file);
  const block = raw['redflag'];
  let chatTemplateKwargs: Record<string, unknown> | undefined;
  if (isPlainObject(block) && block['chat_template_kwargs'] !== undefined) {
    try {
      chatTemplateKwargs = checkChatTemplateKwargs(block['chat_template_kwargs'], 'redflag.chat_template_kwargs');
    } catch (error) {
      throw new RedflagError('INVALID_FILE', (error as Error).message, { file });
    }
  }
  return { rank, alpha, dropout, rslora, targets, exclude, rankPattern, alphaPattern, layers, selected, baseModel, tokenId, categories, baseRowsFile, chatTemplateKwargs };
}

/** Why the module (layer, site) is not one that target_modules, layers_to_transform and exclude_modules select. */
function unselectedWhy(
  p: { targets: string[] | string; exclude?: string[] | string | undefined; layers: number[] | null },
  config: ModelConfig,
  layer: number,
  site: string,
): string {
  const name = peftModuleName(config, layer, site);
  if (p.exclude !== undefined && namesModule(p.exclude, name)) return `${name} is excluded by exclude_modules ${show(p.exclude)}`;
  if (!namesModule(p.targets, name)) return `${typeof p.targets === 'string' ? name : site} is not selected by target_modules ${show(p.targets)}`;
  return `layer ${layer} is not in layers_to_transform ${show(p.layers)}`;
}

/** Reads `trainable_token_indices` and the `redflag` block: the `<rf>` id (or null) and the category flags after it. */
function parseTrainableTokens(
  raw: Record<string, unknown>,
  config: ModelConfig,
  file: string,
): { tokenId: number | null; categories: CategoryFlag[]; baseRowsFile: string | null } {
  const fail = (field: string, message: string, code: 'INVALID_FILE' | 'UNSUPPORTED' = 'INVALID_FILE'): RedflagError =>
    new RedflagError(code, `"${field}" ${message}`, { file });
  const indices = raw['trainable_token_indices'];
  const block = raw['redflag'];
  if (block !== undefined && block !== null && !isPlainObject(block)) throw fail('redflag', `must be an object, got ${show(block)}`);
  if (indices === undefined || indices === null) {
    if (isPlainObject(block) && block['token_id'] !== undefined && block['token_id'] !== null) {
      throw fail('redflag.token_id', `is ${show(block['token_id'])} but "trainable_token_indices" is missing`);
    }
    return { tokenId: null, categories: [], baseRowsFile: null };
  }

  // Normalise to { module name: ids }; a plain list targets the input embedding.
  const names = tokenModuleNames(config);
  let entries: Array<[string, unknown]>;
  if (Array.isArray(indices)) entries = [[names.embed[0]!, indices]];
  else if (isPlainObject(indices)) entries = Object.entries(indices);
  else throw fail('trainable_token_indices', `must be a list of token ids or an object of them, got ${show(indices)}`);

  let embedIds: number[] | null = null;
  let headIds: number[] | null = null;
  for (const [module, ids] of entries) {
    const field = Array.isArray(indices) ? 'trainable_token_indices' : `trainable_token_indices.${module}`;
    if (!Array.isArray(ids) || !ids.every(isIndex)) throw fail(field, `must be a list of token ids, got ${show(ids)}`);
    if (ids.length === 0) throw fail(field, 'lists no token; redflag adapters train the red-flag token (and any category flags after it)', 'UNSUPPORTED');
    if (names.embed.includes(module)) embedIds = ids;
    else if (names.head.includes(module)) headIds = ids;
    else throw fail(field, `names module "${module}"; ${config.hfArchitecture} supports ${[...names.embed, ...names.head].map((n) => `"${n}"`).join(', ')}`, 'UNSUPPORTED');
  }
  if (embedIds === null) throw fail('trainable_token_indices', `has no entry for the input embedding ("${names.embed[0]}")`);
  const tokenId = embedIds[0]!;
  if (tokenId > config.vocabSize) throw fail('trainable_token_indices', `names token ${tokenId}, beyond the vocabulary (${config.vocabSize} rows, one new row allowed)`);
  if (headIds !== null && (headIds.length !== embedIds.length || headIds.some((id, i) => id !== embedIds![i]))) {
    throw fail(`trainable_token_indices.lm_head`, `is ${show(headIds)} but the embedding's is ${show(embedIds)}; they must name the same tokens`);
  }
  if (!config.tieWordEmbeddings && headIds === null) {
    throw fail('trainable_token_indices', 'has no "lm_head" entry, but the model\'s LM head is untied (its <rf> row must be trained too)');
  }

  if (!isPlainObject(block)) throw fail('redflag', 'is missing: an adapter with trainable tokens must carry redflag\'s metadata block');
  const version = block['format_version'];
  if (version !== REDFLAG_FORMAT_VERSION) throw fail('redflag.format_version', `is ${show(version)}; this version reads ${REDFLAG_FORMAT_VERSION}`, 'UNSUPPORTED');
  if (block['token_id'] !== tokenId) throw fail('redflag.token_id', `is ${show(block['token_id'])} but trainable_token_indices names ${tokenId}`);
  if (typeof block['token'] !== 'string' || block['token'] === '') throw fail('redflag.token', `must be the token's text, got ${show(block['token'])}`);
  // Tokens after <rf> are category flags, named in redflag.categories ({ name: id }).
  const named = block['categories'] ?? {};
  if (!isPlainObject(named)) throw fail('redflag.categories', `must be an object of category names to token ids, got ${show(named)}`);
  const byId = new Map<number, string>();
  for (const [name, id] of Object.entries(named)) {
    if (!CATEGORY_NAME.test(name)) throw fail(`redflag.categories.${name}`, 'is not a category name (1-64 letters, digits, "_", "-" or ".")');
    if (!isIndex(id) || !embedIds.slice(1).includes(id)) throw fail(`redflag.categories.${name}`, `is ${show(id)}, not one of the flag tokens after <rf> in trainable_token_indices (${show(embedIds.slice(1))})`);
    byId.set(id, name);
  }
  const categories: CategoryFlag[] = [];
  for (const id of embedIds.slice(1)) {
    const category = byId.get(id);
    if (category === undefined) throw fail('redflag.categories', `names no category for token ${id} of trainable_token_indices`);
    // The flags may each take a new row after the vocabulary: ids below vocabSize + flags.
    if (id >= config.vocabSize + embedIds.length) throw fail('trainable_token_indices', `names token ${id}, beyond the vocabulary (${config.vocabSize} rows, ${embedIds.length} new rows allowed)`);
    categories.push({ category, id });
  }
  if (new Set(embedIds).size !== embedIds.length) throw fail('trainable_token_indices', `lists a token twice: ${show(embedIds)}`);
  if (block['tied'] !== config.tieWordEmbeddings) {
    throw fail('redflag.tied', `is ${show(block['tied'])} but the model's tie_word_embeddings is ${config.tieWordEmbeddings}`);
  }
  const rowsFile = block['base_rows_file'] ?? RED_FLAG_ROWS_FILE;
  if (typeof rowsFile !== 'string' || rowsFile === '' || /[\\/]/.test(rowsFile) || rowsFile.startsWith('.')) {
    throw fail('redflag.base_rows_file', `must be a file name inside the adapter directory, got ${show(rowsFile)}`);
  }
  return { tokenId, categories, baseRowsFile: rowsFile };
}

/** Reads a [K, H] (or, for K = 1, [H]) tensor of K flag rows, checking its shape. */
async function readRow(file: SafetensorsFile, info: TensorInfo, H: number, K = 1): Promise<Float32Array> {
  const ok = (info.shape.length === 2 && info.shape[0] === K && info.shape[1] === H) || (K === 1 && info.shape.length === 1 && info.shape[0] === H);
  if (!ok) {
    throw new RedflagError('INVALID_FILE', `tensor "${info.name}" has shape [${info.shape.join(', ')}], expected [${K}, ${H}] (${K === 1 ? 'one token' : `${K} flag tokens`} × hidden size)`, {
      file: file.path,
    });
  }
  return readFloat(file, info);
}

/** Reads a floating-point tensor as f32, rejecting other dtypes and non-finite values. */
async function readFloat(file: SafetensorsFile, info: TensorInfo): Promise<Float32Array> {
  if (info.dtype !== 'F32' && info.dtype !== 'F16' && info.dtype !== 'BF16') {
    throw new RedflagError('INVALID_FILE', `tensor "${info.name}" has dtype ${info.dtype}; expected F32, F16 or BF16`, { file: file.path });
  }
  const values = toFloat32(await file.read(info.name));
  const bad = firstNonFinite(values);
  if (bad >= 0) throw new RedflagError('INVALID_FILE', `tensor "${info.name}" has a non-finite value at ${bad} (${values[bad]})`, { file: file.path });
  return values;
}

/**
 * Reads a PEFT LoRA adapter directory written by {@link saveAdapter} (or by PEFT, for the
 * LoRA subset redflag implements) and checks it against the base model's `config`: PEFT
 * options, target modules, every key of adapter_model.safetensors (unknown keys, layers out of
 * range, unknown sites, shapes, rank consistency, missing factors) and the `<rf>` rows.
 * Every problem is a RedflagError naming the file and the key or field.
 */
export async function loadAdapter(dir: string, config: ModelConfig): Promise<Adapter> {
  const configPath = join(dir, ADAPTER_CONFIG_FILE);
  const weightsPath = join(dir, ADAPTER_WEIGHTS_FILE);
  const parsed = parseAdapterConfig(await readJsonFile(configPath), config, configPath);
  const H = config.hiddenSize;
  const table = new Map(loraSites(config).map((s) => [s.site, s]));
  const selected = new Set(parsed.selected.map((m) => `${m.layer}/${m.site}`));
  const shape = { ...parsed, config };  // moduleLora's view of the adapter

  // Which key means what: built from the config, so anything else is unknown.
  const layerPrefix = config.architecture === 'gpt2' ? 'base_model.model.transformer.h.' : 'base_model.model.model.layers.';
  const loraKey = /^(0|[1-9]\d*)\.(.+)\.lora_([AB])\.weight$/;

  const file = await SafetensorsFile.open(weightsPath);
  try {
    const fail = (message: string): RedflagError => new RedflagError('INVALID_FILE', message, { file: weightsPath });
    const modules = new Map<string, LoraModuleWeights>();
    const embedKey = peftTrainableTokensKey(config, 'embed');
    const headKey = peftTrainableTokensKey(config, 'head');
    let embedRow: Float32Array | null = null;
    let headRow: Float32Array | null = null;

    for (const info of file.tensors.values()) {
      const key = info.name;
      if (key === embedKey || (key === headKey && !config.tieWordEmbeddings)) {
        if (parsed.tokenId === null) throw fail(`tensor "${key}" is not expected: ${ADAPTER_CONFIG_FILE} has no trainable_token_indices`);
        const row = await readRow(file, info, H, 1 + parsed.categories.length);
        if (key === embedKey) embedRow = row;
        else headRow = row;
        continue;
      }
      const match = key.startsWith(layerPrefix) ? loraKey.exec(key.slice(layerPrefix.length)) : null;
      if (match === null) {
        const hint = key === headKey ? ' (the model ties its LM head, so only the embedding\'s row is stored)' : '';
        throw fail(`unknown tensor "${key}"${hint}; expected LoRA factors named like "${peftLoraKey(config, 0, loraSites(config)[0]!.site, 'A')}"`);
      }
      const layer = Number(match[1]);
      const site = match[2]!;
      const factor = match[3] as 'A' | 'B';
      if (!Number.isSafeInteger(layer) || layer >= config.numLayers) {
        throw fail(`tensor "${key}": layer ${match[1]} is out of range (the model has ${config.numLayers} layers)`);
      }
      const spec = table.get(site);
      if (spec === undefined) throw fail(`tensor "${key}": "${site}" is not an adaptable layer of ${config.hfArchitecture} (known: ${[...table.keys()].join(', ')})`);
      if (!selected.has(`${layer}/${site}`)) throw fail(`tensor "${key}": ${unselectedWhy(parsed, config, layer, site)} in ${ADAPTER_CONFIG_FILE}`);
      const r = moduleLora(shape, layer, site).rank;
      const want = factor === 'A' ? [r, spec.inFeatures] : [spec.outFeatures, r];
      const dims = info.shape;
      if (dims.length !== 2 || dims[0] !== want[0] || dims[1] !== want[1]) {
        const rankDim = factor === 'A' ? dims[0] : dims[1];
        const given = patternValue(parsed.rankPattern, peftModuleName(config, layer, site));
        const why =
          dims.length === 2 && rankDim !== r && (factor === 'A' ? dims[1] === spec.inFeatures : dims[0] === spec.outFeatures)
            ? `: rank ${rankDim} does not match ${given ? `rank_pattern ${show(given.key)}: ${r}` : `r = ${r}`} in ${ADAPTER_CONFIG_FILE}`
            : ` (lora_${factor} of ${site} is ${factor === 'A' ? '[r, in]' : '[out, r]'})`;
        throw fail(`tensor "${key}" has shape [${dims.join(', ')}], expected [${want.join(', ')}]${why}`);
      }
      const id = `${layer}/${site}`;
      let m = modules.get(id);
      if (m === undefined) {
        m = { layer, site, inFeatures: spec.inFeatures, outFeatures: spec.outFeatures, A: new Float32Array(0), B: new Float32Array(0) };
        modules.set(id, m);
      }
      m[factor] = await readFloat(file, info);
    }

    // Every selected module must have both factors.
    for (const { layer, site } of parsed.selected) {
      const m = modules.get(`${layer}/${site}`);
      for (const factor of ['A', 'B'] as const) {
        if (m === undefined || m[factor].length === 0) {
          throw fail(`tensor "${peftLoraKey(config, layer, site, factor)}" is missing (target_modules${parsed.layers ? ' and layers_to_transform' : ''} in ${ADAPTER_CONFIG_FILE} select it)`);
        }
      }
    }

    let redFlag: RedFlagRows | null = null;
    if (parsed.tokenId !== null) {
      if (embedRow === null) throw fail(`tensor "${embedKey}" is missing (${ADAPTER_CONFIG_FILE} declares trainable_token_indices)`);
      if (!config.tieWordEmbeddings && headRow === null) throw fail(`tensor "${headKey}" is missing (the model's LM head is untied)`);
      const base = await readBaseRows(join(dir, parsed.baseRowsFile!), config, parsed.tokenId, 1 + parsed.categories.length);
      redFlag = { tokenId: parsed.tokenId, categories: parsed.categories, embed: embedRow, head: headRow, baseEmbed: base.embed, baseHead: base.head };
    }

    const order = new Map(loraSites(config).map((s, i) => [s.site, i]));
    const sorted = [...modules.values()].sort((a, b) => a.layer - b.layer || order.get(a.site)! - order.get(b.site)!);
    return {
      rank: parsed.rank,
      alpha: parsed.alpha,
      dropout: parsed.dropout,
      rslora: parsed.rslora,
      targets: parsed.targets,
      ...(parsed.exclude !== undefined ? { exclude: parsed.exclude } : {}),
      ...(parsed.rankPattern !== undefined ? { rankPattern: parsed.rankPattern } : {}),
      ...(parsed.alphaPattern !== undefined ? { alphaPattern: parsed.alphaPattern } : {}),
      modules: sorted,
      redFlag,
      baseModel: parsed.baseModel,
      config,
      ...(parsed.chatTemplateKwargs !== undefined ? { chatTemplateKwargs: parsed.chatTemplateKwargs } : {}),
    };
  } finally {
    await file.close();
  }
}

/** Reads redflag_rows.safetensors: the `<rf>` rows before training. */
async function readBaseRows(path: string, config: ModelConfig, tokenId: number, K: number): Promise<{ embed: Float32Array; head: Float32Array | null }> {
  const file = await SafetensorsFile.open(path);
  try {
    const fail = (message: string): RedflagError => new RedflagError('INVALID_FILE', message, { file: path });
    const stored = file.metadata['token_id'];
    if (stored !== undefined && stored !== String(tokenId)) throw fail(`metadata token_id is ${stored} but ${ADAPTER_CONFIG_FILE} names ${tokenId}`);
    const allowed = config.tieWordEmbeddings ? ['base_embed'] : ['base_embed', 'base_head'];
    for (const name of file.tensors.keys()) {
      if (!allowed.includes(name)) throw fail(`unknown tensor "${name}" (expected ${allowed.map((n) => `"${n}"`).join(' and ')})`);
    }
    const row = async (name: string): Promise<Float32Array> => {
      const info = file.tensors.get(name);
      if (info === undefined) throw fail(`tensor "${name}" is missing`);
      return readRow(file, info, config.hiddenSize, K);
    };
    return { embed: await row('base_embed'), head: config.tieWordEmbeddings ? null : await row('base_head') };
  } finally {
    await file.close();
  }
}
