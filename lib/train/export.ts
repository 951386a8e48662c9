/**
 * Moving trained weights between the native engine and files: the LoRA adapter (PEFT format,
 * with the tokenizer that has `<rf>`), adapters loaded back onto a model, and fully
 * fine-tuned weights written as a Hugging Face model.
 * @module
 */
import { realpath } from 'node:fs/promises';
import { join, resolve } from 'node:path';

import { RedflagError } from '../errors.js';
import { nativeError } from '../native.js';
import { openModelFiles, type Model } from '../model/model.js';
import { addFlagTokens, addRedFlagToken } from '../model/red-flag.js';
import { RED_FLAG_TOKEN, categoryFlagToken } from '../model/red-flag-token.js';
import { fromFloat32, toFloat32, type DeferredTensor } from '../model/safetensors.js';
import { saveModel } from '../model/save.js';
import type { Tokenizer } from '../model/tokenizer.js';
import { loadAdapter, moduleLora, saveAdapter, type Adapter, type LoraModuleWeights } from './adapter.js';
import { planAdapterMerge } from './merge.js';
import type { TrainConfig } from './config.js';

const LORA_PARAM = /^layers\.(\d+)\.(.+)\.lora_([AB])$/;

/** Reads rows of a checkpoint matrix as f32, [rows.length × width]. */
async function tensorRows(model: Model, name: string, rows: readonly number[]): Promise<Float32Array> {
  const t = await model.readTensor(name);
  const width = t.shape[1]!;
  const all = toFloat32(t);
  const out = new Float32Array(rows.length * width);
  rows.forEach((row, i) => out.set(all.subarray(row * width, (row + 1) * width), i * width));
  return out;
}

/**
 * The adapter currently on the model (after training, or as loaded), in memory; with
 * `rfToken` >= 0 its flag rows: `<rf>` and the model's category flags ({@link Model.flagCategories}).
 */
export async function currentAdapter(model: Model, options: { rank: number; alpha: number; dropout: number; rslora: boolean; targets: string[] }, rfToken: number): Promise<Adapter> {
  const byModule = new Map<string, Partial<LoraModuleWeights>>();
  let embed: Float32Array | null = null;
  let head: Float32Array | null = null;
  for (const p of model.engine.params()) {
    const m = LORA_PARAM.exec(p.name);
    if (m) {
      const key = `${m[1]}|${m[2]}`;
      const entry = byModule.get(key) ?? { layer: Number(m[1]), site: m[2]! };
      const data = model.engine.getParam(p.name, 'value');
      if (m[3] === 'A') {
        entry.A = data;
        entry.inFeatures = p.shape[1]!;
      } else {
        entry.B = data;
        entry.outFeatures = p.shape[0]!;
      }
      byModule.set(key, entry);
    } else if (p.name === 'rf.embed') {
      embed = model.engine.getParam(p.name, 'value');
    } else if (p.name === 'rf.head') {
      head = model.engine.getParam(p.name, 'value');
    }
  }
  const modules = [...byModule.values()] as LoraModuleWeights[];
  modules.sort((a, b) => a.layer - b.layer || a.site.localeCompare(b.site));
  const tied = model.plan.lmHeadName === null;
  const categories = model.flagCategories.map((c) => ({ ...c }));
  const ids = [rfToken, ...categories.map((c) => c.id)];
  return {
    ...options,
    modules,
    redFlag:
      rfToken >= 0 && embed
        ? {
            tokenId: rfToken,
            categories,
            embed,
            head: tied ? null : head,
            baseEmbed: await tensorRows(model, model.plan.embedName, ids),
            baseHead: tied ? null : await tensorRows(model, model.plan.lmHeadName!, ids),
          }
        : null,
    baseModel: model.dir,
    config: model.config,
    // The prompts it was trained on were rendered with these: it should be served with them.
    ...(model.tokenizer && Object.keys(model.tokenizer.chatTemplateKwargs).length > 0 ? { chatTemplateKwargs: { ...model.tokenizer.chatTemplateKwargs } } : {}),
  };
}

/**
 * Saves the trained adapter and the tokenizer (with `<rf>`) into output/adapter and, when the
 * config asks, the merged model (W + scale·B·A, `<rf>` rows in place) into output/merged.
 */
export async function exportAdapter(model: Model, config: TrainConfig, rfToken: number, targets: string[]): Promise<string> {
  const dir = join(config.output, 'adapter');
  const { rank, alpha, dropout, rslora } = config.lora;
  const adapter = await currentAdapter(model, { rank, alpha, dropout, rslora, targets }, rfToken);
  await saveAdapter(dir, adapter, { overwrite: true });
  if (model.tokenizer) await model.tokenizer.save(dir, { overwrite: true });
  if (config.merge) await saveMerged(model, adapter, join(config.output, 'merged'));
  return dir;
}

/**
 * Writes base weights with the adapter merged in, as a Hugging Face model directory. Each merged
 * tensor is made as the writer reaches it: one tensor at a time beyond the model's memory.
 */
export async function saveMerged(model: Model, adapter: Adapter, dir: string): Promise<void> {
  const merged = planAdapterMerge(adapter, model.plan, (name) => model.tensor(name), (name) => model.readTensor(name));
  await saveModel(model, dir, { overwrite: true, replace: merged });
}

/**
 * Writes the model in `modelDir` with the adapter in `adapterDir` merged into its weights to
 * `output`, as a Hugging Face model directory (what the refusal baseline ships; PEFT's
 * `merge_and_unload` + `save_pretrained`). Works on the files alone: no engine, and one tensor
 * at a time in memory, so an 8B model merges on a machine with a few GB free. A non-empty
 * `output` is an error unless `options.overwrite`; `output` may never be `modelDir`.
 */
export async function mergeAdapterInto(modelDir: string, adapterDir: string, output: string, options: { overwrite?: boolean } = {}): Promise<string> {
  // Real paths: a link to the base model is the base model.
  const real = (path: string) => realpath(path).catch(() => resolve(path));
  if ((await real(output)) === (await real(modelDir))) {
    throw new RedflagError('INVALID_ARGUMENT', 'the merged model would replace the base model it is made from: choose another output directory', { file: output });
  }
  const files = await openModelFiles(modelDir);
  try {
    const adapter = await loadAdapter(adapterDir, files.config);
    const rf = adapter.redFlag;
    if (rf && lacksFlags(files.tokenizer, files.config.vocabSize, rf)) {
      // As applyAdapter: the flags go into the tokenizer and config; the merge grows the matrices.
      if (!files.tokenizer) throw new RedflagError('NO_TOKENIZER', `${modelDir} has no tokenizer.json; the adapter's red-flag token needs one`);
      const { choice, flags } = addFlagTokens(files.tokenizer, { categories: rf.categories.map((c) => c.category) });
      const ids = [choice.id, ...flags.map((f) => f.id)];
      checkFlagIds(rf, ids, adapterDir);
      const rows = Math.max(files.config.vocabSize, ...ids.map((id) => id + 1));
      files.config.vocabSize = rows;
      files.config.raw['vocab_size'] = rows;
    }
    const { store } = files;
    const merged = planAdapterMerge(adapter, files.plan, (name) => store.info(name), (name) => store.read(name));
    await saveModel({ ...files, tensor: (name) => store.deferred(name) }, output, { overwrite: options.overwrite ?? false, replace: merged });
  } finally {
    await files.store.close();
  }
  return output;
}

/** Whether the tokenizer lacks the adapter's flag tokens at their ids (a base that predates them). */
function lacksFlags(tokenizer: Tokenizer | null, vocabSize: number, rf: NonNullable<Adapter['redFlag']>): boolean {
  const present = (id: number, text: string) => id < vocabSize && tokenizer?.idToToken(id) === text;
  return !(present(rf.tokenId, RED_FLAG_TOKEN) && rf.categories.every((c) => present(c.id, categoryFlagToken(c.category))));
}

/** Adding the flags to the base must give the ids the adapter was trained with. */
function checkFlagIds(rf: NonNullable<Adapter['redFlag']>, got: readonly number[], dir: string): void {
  const want = [rf.tokenId, ...rf.categories.map((c) => c.id)];
  if (want.some((id, i) => id !== got[i])) {
    throw new RedflagError('INVALID_ARGUMENT', `the adapter's flag tokens are ${want.join(', ')}, but adding them to this model gives ${got.join(', ')}: is it the adapter's base model?`, {
      file: dir,
    });
  }
}

/** Options of {@link applyAdapter}. */
export interface ApplyAdapterOptions {
  /**
   * GPU only: fold the LoRA factors into the weights (PEFT's `merge_and_unload`, with
   * {@link mergeAdapterTensors}' arithmetic) instead of running them beside every projection.
   * Decoding then costs what the base model's does (a live adapter adds two small matrix
   * products per adapted projection and step); the weights round once more (bf16: the merged
   * checkpoint's bits). Irreversible: the adapter can no longer be switched off or replaced, and
   * the model cannot be trained (reload it). Default false.
   */
  merge?: boolean;
}

/**
 * Each model's flag tokens and chat-template kwargs before an adapter first set them (its own,
 * from its weights and load options, or none): applying an adapter clears the last one's trained
 * rows and kwargs, so one without them goes back to these.
 */
const flagsBeforeAdapters = new WeakMap<Model, { id: number | null; categories: Model['flagCategories']; templateKwargs: Readonly<Record<string, unknown>> }>();

/**
 * Loads a saved adapter onto a model for inference: LoRA factors on their projections and the
 * trained `<rf>` rows, in place of the adapter applied before (if any). The model then computes
 * exactly what the trained model computed (merged: up to the rounding of the merged weights, see
 * {@link ApplyAdapterOptions.merge}).
 */
export async function applyAdapter(model: Model, dir: string, options: ApplyAdapterOptions = {}): Promise<Adapter> {
  const merge = options.merge ?? false;
  if (typeof merge !== 'boolean') throw new RedflagError('INVALID_ARGUMENT', `applyAdapter: merge must be a boolean, got ${JSON.stringify(merge)}`);
  if (merge && model.device.kind !== 'cuda') {
    throw new RedflagError('INVALID_ARGUMENT', `applyAdapter: merge is for models on a GPU (device 'cuda'); this one is on '${model.device.name}', where the adapter runs live at little cost`);
  }
  const adapter = await loadAdapter(dir, model.config);
  if (!flagsBeforeAdapters.has(model)) {
    flagsBeforeAdapters.set(model, { id: model.redFlagTokenId, categories: model.flagCategories.map((c) => ({ ...c })), templateKwargs: model.tokenizer?.chatTemplateKwargs ?? {} });
  }
  const rf = adapter.redFlag;
  if (rf && lacksFlags(model.tokenizer, model.vocabSize, rf)) {
    // The base checkpoint predates the flags: add them the way training did, which must land on the same ids.
    const added = await addRedFlagToken(model, model.tokenizer, { categories: rf.categories.map((c) => c.category) });
    checkFlagIds(rf, [added.id, ...added.categories.map((c) => c.id)], dir);
  }
  await model.runNative(() => {
    model.engine.clearAdapters();
    try {
      for (const m of adapter.modules) {
        // The engine names GPT-2 sites by their block path, Llama sites by the projection name.
        const target = model.config.architecture === 'gpt2' ? m.site : m.site.slice(m.site.indexOf('.') + 1);
        const { rank, scale } = moduleLora(adapter, m.layer, m.site);
        if (merge) model.engine.mergeLora(m.layer, target, m.A, m.B, rank, scale);
        else model.engine.addLora(m.layer, target, m.A, m.B, rank, scale);
      }
      if (adapter.redFlag) {
        const head = adapter.redFlag.head ?? adapter.redFlag.embed; // tied: one row serves both
        const ids = [adapter.redFlag.tokenId, ...adapter.redFlag.categories.map((c) => c.id)];
        model.engine.setTokenRows(ids.length === 1 ? ids[0]! : Int32Array.from(ids), adapter.redFlag.embed, head);
      }
    } catch (error) {
      // Out of GPU memory part way: never a model that runs half an adapter. Live factors come
      // off again; merged ones are in the weights for good.
      if (!merge) {
        model.engine.clearAdapters();
        throw error;
      }
      const e = nativeError(error);
      throw new RedflagError(e.code, `${e.message}; the adapter is partly merged into the weights: reload the model`, { file: dir, cause: error });
    }
  });
  // The adapter's template kwargs under the ones the model was loaded with (those were asked for).
  if (model.tokenizer) model.tokenizer.chatTemplateKwargs = { ...adapter.chatTemplateKwargs, ...flagsBeforeAdapters.get(model)!.templateKwargs };
  if (adapter.redFlag) {
    model.redFlagTokenId = adapter.redFlag.tokenId;
    model.flagCategories = adapter.redFlag.categories.map((c) => ({ ...c }));
  } else {
    // The last adapter's flag rows are gone (a token added for it keeps an untrained row).
    const before = flagsBeforeAdapters.get(model)!;
    model.redFlagTokenId = before.id;
    model.flagCategories = before.categories.map((c) => ({ ...c }));
  }
  return adapter;
}

/**
 * Writes a fully fine-tuned model (the engine's f32 masters) as a Hugging Face directory, in each
 * tensor's checkpoint dtype (F32 when that is not a float type); tensors are fetched from the
 * engine as the writer reaches them.
 */
export async function saveTrainedModel(model: Model, config: TrainConfig): Promise<string> {
  const dir = join(config.output, 'model');
  const names = new Set(model.engine.params().map((p) => p.name));
  const trained = new Map<string, DeferredTensor>();
  for (const t of model.plan.tensors) {
    if (!names.has(t.name)) throw new RedflagError('NATIVE', `no trained tensor ${t.name}`);
    // A fused tensor (q/k/v, gate/up) is fetched once and kept until its last source is written.
    let fetched: Float32Array | null = null;
    let unread = t.sources.length;
    const fetch = (): Float32Array => {
      const value = (fetched ??= model.engine.getParam(t.name, 'value'));
      if (--unread === 0) fetched = null;
      return value;
    };
    let row = 0;
    for (const [i, source] of t.sources.entries()) {
      const shape = t.shapes[i]!;
      const original = model.store.has(source) ? model.store.info(source).dtype : null;
      const dtype = original === 'BF16' || original === 'F16' ? original : 'F32';
      const first = row; // this source's first row in the engine's [rows, cols] tensor
      row += shape[0]!;
      trained.set(source, {
        dtype,
        shape,
        read: async () => {
          // The engine holds [rows, cols] ([out, in]).
          const value = fetch();
          let data: Float32Array;
          if (t.srcIsKN) {
            // GPT-2 Conv1D: HF stores [in, out]; the engine holds [out, in].
            const [inF, outF] = shape as [number, number];
            data = new Float32Array(inF * outF);
            for (let o = 0; o < outF; o++) for (let k = 0; k < inF; k++) data[k * outF + o] = value[o * inF + k]!;
          } else {
            const count = shape.reduce((a, b) => a * b, 1);
            const width = count / shape[0]!;
            data = value.slice(first * width, first * width + count);
          }
          return fromFloat32(data, shape, dtype).data;
        },
      });
    }
  }
  await saveModel(model, dir, { overwrite: true, replace: trained });
  return dir;
}
