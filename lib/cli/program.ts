/**
 * The `redflag` command line: commands and their flags.
 * @module
 */
import { Command, InvalidArgumentError } from 'commander';

import { RedflagError } from '../errors.js';
import { loadModel, type Model } from '../model/model.js';
import type { DeviceSpec } from '../model/device.js';
import { moduleLora, type Adapter } from '../train/adapter.js';
import { applyAdapter, mergeAdapterInto } from '../train/export.js';
import { runDemo } from '../demo.js';
import { runEval } from './eval.js';
import { runTrain } from './train.js';
import { CHAT_TEMPLATE_KWARGS_HELP, device, modelOptions, templateKwargs, type EngineFlags } from './model-flags.js';
import { runServe, type ServeFlags } from './serve.js';
import { runStudyCommand } from './study.js';

function integer(name: string, min: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}`);
    return n;
  };
}

function number(name: string, min: number, max = Infinity) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isFinite(n) || n < min || n > max) throw new InvalidArgumentError(`${name} must be a number in [${min}, ${max}]`);
    return n;
  };
}

function kvCacheMb(value: string): number | 'auto' {
  const n = Number(value);
  if (value === 'auto') return 'auto';
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError("kv-cache-mb must be 'auto' or an integer >= 1");
  return n;
}

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('port must be an integer from 0 to 65535');
  return n;
}

function mode(value: string): 'block' | 'flag' | 'reflect' {
  if (value !== 'block' && value !== 'flag' && value !== 'reflect') throw new InvalidArgumentError("mode must be 'block', 'flag' or 'reflect'");
  return value;
}

function dtype(value: string): 'f32' | 'bf16' {
  if (value !== 'f32' && value !== 'bf16') throw new InvalidArgumentError("dtype must be 'f32' or 'bf16'");
  return value;
}

interface ModelFlags extends EngineFlags {
  model: string;
}

function withModelFlags(cmd: Command): Command {
  return cmd
    .requiredOption('-m, --model <dir>', 'Hugging Face model directory (config.json + safetensors)')
    .option('--device <device>', "where the model runs: 'cpu', 'cuda' or 'cuda:N' (the CUDA build: npm run build:cuda)", device, 'cpu')
    .option('--dtype <dtype>', "weights in the engine: 'f32' or 'bf16' (default: f32 on the CPU, bf16 on a GPU)", dtype)
    .option('--threads <n>', 'threads for native work (default: number of cores)', integer('threads', 1))
    .option('--chat-template-kwargs <json>', CHAT_TEMPLATE_KWARGS_HELP, templateKwargs);
}

async function open(flags: ModelFlags): Promise<Model> {
  return loadModel(flags.model, modelOptions(flags));
}

/**
 * What an adapter adapts, at which rank and scale: its PEFT settings, and its modules grouped by
 * (rank, alpha), each group with its scale and `layer/site` ids (for `redflag info --adapter`).
 */
function describeAdapter(dir: string, adapter: Adapter) {
  const groups = new Map<string, { rank: number; alpha: number; scale: number; modules: string[] }>();
  for (const m of adapter.modules) {
    const { rank, alpha, scale } = moduleLora(adapter, m.layer, m.site);
    const key = `${rank}/${alpha}`;
    if (!groups.has(key)) groups.set(key, { rank, alpha, scale, modules: [] });
    groups.get(key)!.modules.push(`${m.layer}/${m.site}`);
  }
  const rf = adapter.redFlag;
  return {
    dir,
    rank: adapter.rank,
    alpha: adapter.alpha,
    rslora: adapter.rslora,
    targets: adapter.targets,
    exclude: adapter.exclude ?? null,
    rankPattern: adapter.rankPattern ?? null,
    alphaPattern: adapter.alphaPattern ?? null,
    layers: [...new Set(adapter.modules.map((m) => m.layer))],
    sites: [...new Set(adapter.modules.map((m) => m.site))],
    groups: [...groups.values()],
    redFlag: rf ? { tokenId: rf.tokenId, categories: rf.categories } : null,
  };
}

function formatBytes(n: number): string {
  return n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`;
}

export function buildProgram(): Command {
  const program = new Command()
    .name('redflag')
    .description('Turn a language model into its own harmfulness detector with a red-flag token.')
    .showHelpAfterError();

  withModelFlags(program.command('info').description('describe a model directory (and an adapter for it)'))
    .option('--adapter <dir>', "a LoRA adapter for the model (redflag train's or PEFT's): what it adapts, at which ranks")
    .option('--json', 'print JSON')
    .action(async (flags: ModelFlags & { json?: boolean; adapter?: string }) => {
      const model = await open(flags);
      try {
        // Applied as generate and serve apply it: checked against the model, <rf> added.
        const adapter = flags.adapter === undefined ? null : describeAdapter(flags.adapter, await applyAdapter(model, flags.adapter));
        const c = model.config;
        const info = {
          dir: model.dir,
          architecture: c.hfArchitecture,
          layers: c.numLayers,
          hidden: c.hiddenSize,
          intermediate: c.intermediateSize,
          heads: c.numHeads,
          kvHeads: c.numKvHeads,
          headDim: c.headDim,
          vocab: c.vocabSize,
          maxPositions: c.maxPositions,
          positions: c.positions,
          rope: c.positions === 'rope' ? c.rope : null,
          slidingWindow: c.slidingWindow,
          tiedEmbeddings: c.tieWordEmbeddings,
          engine: {
            device: model.device.name,
            dtype: model.dtype,
            threads: model.threads,
            isa: model.isa,
            weightBytes: model.weightBytes,
            kvBytesPerPosition: model.kvBytesPerPosition,
            // A GPU's memory with the weights loaded: what is left for the KV cache (--kv-cache-mb).
            deviceMemory: model.deviceMemory(),
            gpu: model.gpuInfo(),
          },
          unusedTensors: model.plan.unused,
          warnings: model.store.warnings,
          tokenizer: model.tokenizer
            ? { vocab: model.tokenizer.vocabSize, chatTemplate: model.tokenizer.chatTemplate !== null }
            : null,
          eosTokenIds: model.eosTokenIds,
          redFlagTokenId: model.redFlagTokenId,
          adapter,
        };
        if (flags.json) {
          console.log(JSON.stringify(info, null, 2));
          return;
        }
        const rope = info.rope
          ? `rope theta ${info.rope.theta}${info.rope.scaling ? `, ${info.rope.scaling.type} scaling x${info.rope.scaling.factor}` : ''}`
          : 'learned positions';
        console.log(`${info.architecture} in ${info.dir}`);
        console.log(`  ${info.layers} layers, hidden ${info.hidden}, intermediate ${info.intermediate}`);
        console.log(`  ${info.heads} heads (${info.kvHeads} KV) x ${info.headDim}, ${rope}` +
          (info.slidingWindow ? `, sliding window ${info.slidingWindow}` : ''));
        console.log(`  vocabulary ${info.vocab}${info.tiedEmbeddings ? ', tied embeddings' : ''}, ${info.maxPositions} positions`);
        console.log(`  engine: ${info.engine.device}, ${info.engine.dtype} weights (${formatBytes(info.engine.weightBytes)}), ${info.engine.threads} threads, ${info.engine.isa}`);
        const gpu = info.engine.gpu;
        if (gpu) console.log(`  GPU: ${gpu.name}, compute capability ${gpu.computeCapability}; the build holds code for ${gpu.architectures}`);
        const memory = info.engine.deviceMemory;
        if (memory) {
          const positions = Math.floor(memory.free / info.engine.kvBytesPerPosition);
          console.log(`  GPU memory: ${formatBytes(memory.free)} free of ${formatBytes(memory.total)} with the weights loaded: ` +
            `room for about ${positions.toLocaleString('en-US')} KV-cache positions (${formatBytes(info.engine.kvBytesPerPosition)} each; --kv-cache-mb)`);
        }
        console.log(`  tokenizer: ${info.tokenizer ? `${info.tokenizer.vocab} tokens${info.tokenizer.chatTemplate ? ', chat template' : ''}` : 'none'}`);
        console.log(`  EOS ids: ${info.eosTokenIds.join(', ') || 'none'}; red-flag token: ${info.redFlagTokenId ?? 'not added'}`);
        if (info.unusedTensors.length) console.log(`  unused tensors: ${info.unusedTensors.join(', ')}`);
        for (const w of info.warnings) console.log(`  warning: ${w}`);
        if (adapter) {
          const flag = adapter.redFlag ? `<rf> ${adapter.redFlag.tokenId}${adapter.redFlag.categories.length ? ` and ${adapter.redFlag.categories.length} category flags` : ''}` : 'no <rf> rows';
          console.log(`  adapter ${adapter.dir}: LoRA on ${adapter.groups.reduce((n, g) => n + g.modules.length, 0)} modules ` +
            `(layers ${adapter.layers.join(', ')}; ${adapter.sites.join(', ')}), ${flag}${adapter.rslora ? ', rsLoRA' : ''}`);
          for (const g of adapter.groups) {
            const list = g.modules.length <= 6 ? g.modules.join(', ') : `${g.modules.slice(0, 5).join(', ')}, ... (${g.modules.length})`;
            console.log(`    rank ${g.rank}, alpha ${g.alpha} (scale ${Number(g.scale.toPrecision(4))}): ${list}`);
          }
        }
      } finally {
        model.dispose();
      }
    });

  withModelFlags(program.command('generate').description('generate text from a prompt'))
    .requiredOption('-p, --prompt <text>', 'the prompt')
    .option('--chat', "wrap the prompt as a user message with the model's chat template")
    .option('--system <text>', 'system message (with --chat)')
    .option('-n, --max-tokens <n>', 'most tokens to generate', integer('max-tokens', 0), 128)
    .option('-t, --temperature <t>', '0 = greedy', number('temperature', 0), 0)
    .option('--top-k <k>', 'sample from the k most likely tokens (0 = all)', integer('top-k', 0), 0)
    .option('--top-p <p>', 'nucleus sampling mass, in (0, 1]', (value: string) => {
      const p = Number(value);
      if (!(p > 0 && p <= 1)) throw new InvalidArgumentError('top-p must be a number in (0, 1]');
      return p;
    }, 1)
    .option('--seed <n>', 'sampling seed', integer('seed', 0))
    .option('--stop <text...>', 'stop strings')
    .action(async (flags: ModelFlags & {
      prompt: string; chat?: boolean; system?: string; maxTokens: number; temperature: number;
      topK: number; topP: number; seed?: number; stop?: string[];
    }) => {
      if (flags.system !== undefined && !flags.chat) throw new RedflagError('INVALID_ARGUMENT', '--system goes into the chat template: add --chat');
      const model = await open(flags);
      const controller = new AbortController();
      const onSigint = () => controller.abort();
      process.once('SIGINT', onSigint);
      try {
        const tokenizer = model.tokenizer;
        if (!tokenizer) throw new RedflagError('NO_TOKENIZER', `${flags.model} has no tokenizer.json`);
        let ids: number[];
        if (flags.chat) {
          const messages = [
            ...(flags.system ? [{ role: 'system', content: flags.system }] : []),
            { role: 'user', content: flags.prompt },
          ];
          ids = tokenizer.encodeChat(messages, { addGenerationPrompt: true });
        } else {
          ids = tokenizer.encode(flags.prompt);
        }
        const started = performance.now();
        let n = 0;
        for await (const { text } of model.generate(ids, {
          maxTokens: flags.maxTokens, temperature: flags.temperature, topK: flags.topK, topP: flags.topP,
          ...(flags.seed !== undefined ? { seed: flags.seed } : {}), ...(flags.stop ? { stop: flags.stop } : {}),
          signal: controller.signal,
        })) {
          process.stdout.write(text);
          n++;
        }
        const seconds = (performance.now() - started) / 1000;
        process.stdout.write('\n');
        console.error(`[${n} tokens, ${(n / seconds).toFixed(1)} tokens/s including prefill of ${ids.length}]`);
      } finally {
        process.off('SIGINT', onSigint);
        model.dispose();
      }
    });

  program
    .command('train')
    .description('train a red-flag LoRA adapter (or the refusal baseline, or a language model)')
    .option('-c, --config <file>', 'JSON training config (flags override its fields)')
    .option('-m, --model <dir>', 'Hugging Face model directory')
    .option('-o, --output <dir>', 'output directory (adapter, tokenizer, metrics.jsonl, checkpoint)')
    .option('--harmful <files...>', 'data files whose conversations are all harmful')
    .option('--benign <files...>', 'data files whose conversations are all benign')
    .option('--data <files...>', 'data files labelled per row (label / harmful field or --label-column)')
    .option('--synthetic', 'train on the built-in generated data set')
    .option('--prompt-column <name>', 'CSV column with the prompt')
    .option('--response-column <name>', 'CSV column with the response')
    .option('--label-column <name>', 'CSV column with the label')
    .option('--skip-invalid', 'skip malformed rows (counted) instead of failing')
    .option('--objective <name>', 'redflag | refusal | lm')
    .option('--mode <mode>', 'lora | full')
    .option('--rank <r>', 'LoRA rank', integer('rank', 1))
    .option('--alpha <a>', 'LoRA alpha', number('alpha', 0))
    .option('--targets <names...>', 'LoRA target modules (PEFT names)')
    .option('--lr <lr>', 'peak learning rate', number('lr', 0))
    .option('--steps <n>', 'optimizer steps', integer('steps', 1))
    .option('--batch-size <n>', 'conversations per micro-batch', integer('batch-size', 1))
    .option('--grad-accum <n>', 'micro-batches per optimizer step', integer('grad-accum', 1))
    .option('--max-tokens <n>', 'longest conversation in tokens', integer('max-tokens', 8))
    .option('--seed <n>', 'seed of everything random', integer('seed', 0))
    .option('--eval-every <n>', 'held-out evaluation interval in steps (0: only at the end)', integer('eval-every', 0))
    .option('--checkpoint-every <n>', 'checkpoint interval in steps (0: only at the end)', integer('checkpoint-every', 0))
    .option('--resume', 'continue from the checkpoint in the output directory')
    .option('--overwrite', 'start over in an output directory that holds an earlier run (its checkpoint, metrics and results are replaced)')
    .option('--adversarial <kind>', "RF-AT: 'embedding' trains the flag on prompts perturbed in embedding space against it")
    .option('--adv-epsilon <f>', 'RF-AT: perturbation radius relative to each prompt embedding norm (default 0.1)', number('adv-epsilon', 0))
    .option('--adv-steps <n>', 'RF-AT: inner attack steps (default 3)', integer('adv-steps', 1))
    .option('--rf-position <where>', "red-flag targets: 'sampled' (the paper's method) or 'start' (the Fixed-Pos RF baseline: the first answer position only)")
    .option('--flag-categories <list>', "one flag <rf:NAME> per risk category: 'auto' (every category of the harmful data) or NAME,NAME,…; others train <rf>")
    .option('--category-map <file>', 'JSON object mapping the data\'s categories to flag category names')
    .option('--merge', 'also write the merged model')
    .option('--device <device>', "where training runs: 'cpu', 'cuda' or 'cuda:N' (the CUDA build: npm run build:cuda)", device)
    .option('--recompute', 'GPU: recompute each block\'s activations in the backward instead of keeping them (long sequences)')
    .option('--world-size <n>', 'data-parallel: processes (one per GPU) training together (see README, Training)', integer('world-size', 1))
    .option('--process-rank <n>', 'data-parallel: this process\'s rank, 0 .. world size - 1 (rank 0 writes the outputs)', integer('process-rank', 0))
    .option('--group-file <file>', 'data-parallel: where rank 0 leaves the group id for the others (a new path each run)')
    .option('--dtype <dtype>', "frozen weights: 'f32' or 'bf16' (default: f32 on the CPU, bf16 on a GPU)", dtype)
    .option('--threads <n>', 'threads for native work', integer('threads', 1))
    .option('--chat-template-kwargs <json>', `${CHAT_TEMPLATE_KWARGS_HELP} (the adapter records them)`, templateKwargs)
    .action(async (flags: Record<string, unknown>) => {
      await runTrain(flags);
    });

  program
    .command('merge')
    .description("write a model with a LoRA adapter merged into its weights (PEFT's merge_and_unload), from the files alone")
    .requiredOption('-m, --model <dir>', 'the base model directory (config.json + safetensors)')
    .requiredOption('--adapter <dir>', "the adapter (redflag train's or PEFT's); its <rf> rows go into the embedding")
    .requiredOption('-o, --output <dir>', 'where the merged model goes (a new or empty directory)')
    .option('--overwrite', 'replace the files of a model already in the output directory')
    .action(async (flags: { model: string; adapter: string; output: string; overwrite?: boolean }) => {
      const t0 = performance.now();
      await mergeAdapterInto(flags.model, flags.adapter, flags.output, { overwrite: flags.overwrite ?? false });
      console.error(`merged ${flags.adapter} into ${flags.model}: ${flags.output} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
    });

  withModelFlags(program.command('serve').description('serve the detector over an OpenAI-compatible HTTP API (see README, Server)'))
    .option('--adapter <dir>', 'red-flag adapter directory (written by redflag train)')
    .option('--merge-adapter', "GPU: fold the adapter's LoRA factors into the weights (faster decoding; see README, Server)")
    .option('--served-model-name <id>', 'the model id clients use (default: the model directory name)')
    .option('--host <host>', 'address to listen on', '127.0.0.1')
    .option('--port <n>', 'port to listen on (0: any free port)', port, 8000)
    .option('--api-key <key>', 'require "Authorization: Bearer <key>" (default: env REDFLAG_API_KEY; prefer it, flags show in ps)')
    .option('--threshold <p>', 'p(<rf>) at which an answer counts as flagged', number('threshold', 0, 1), 0.5)
    .option('--mode <mode>', 'on a flag: block | flag | reflect', mode, 'block')
    .option('--max-concurrent <n>', 'most requests in flight (more get 429)', integer('max-concurrent', 1), 64)
    .option('--kv-cache-mb <n|auto>', "KV cache for all generations together, MiB, or 'auto': a GPU's memory left after the weights and a step (default: auto on a GPU, 2048 on the CPU)", kvCacheMb)
    .option('--gpu-memory-fraction <f>', "with --kv-cache-mb auto: the share of the GPU's memory to fill (default 0.9)", number('gpu-memory-fraction', 0.01, 1))
    .option('--max-batch <n>', 'most generations advanced together in one step (default 32)', integer('max-batch', 1))
    .option('--max-step-tokens <n>', 'most tokens one step takes, all generations together; prompts are read in chunks within it (default 2048)', integer('max-step-tokens', 1))
    .option('--overlap-steps', 'start each decode step before the last one\'s tokens are handed out (default on a GPU)')
    .option('--no-overlap-steps', 'one decode step after another (default on the CPU)')
    .option('--drain-seconds <n>', 'on SIGTERM, how long running requests may finish before they are cancelled', number('drain-seconds', 0), 30)
    .option('--no-request-log', 'do not write the JSON log line per request to stdout')
    .option('--log-content', 'add prompts and answers to the request log lines (off: they may be personal or harmful)')
    .action(async (flags: ServeFlags) => {
      await runServe(flags);
    });

  program
    .command('eval')
    .description('measure detection, attacks and utility of variants against the base model (see README, Evaluation)')
    .option('-c, --config <file>', 'JSON eval config (flags override its fields)')
    .option('-m, --model <dir>', 'the base model directory')
    .option('--variant <name=path...>', 'a model under test: NAME=ADAPTER_DIR, NAME=MODEL_DIR or base (repeatable; the base is always included)')
    .option('--harmful <files...>', 'data files whose conversations are all harmful')
    .option('--benign <files...>', 'data files whose conversations are all benign')
    .option('--data <files...>', 'data files labelled per row or by their format (XSTest, JailbreakBench artifacts)')
    .option('--synthetic', "the built-in synthetic corpus's held-out test split")
    .option('--synthetic-per-category <n>', 'training conversations per category the synthetic test split is drawn beside, as train and demo draw it (30: demo --small, 60: demo); the test split has a quarter of that', integer('synthetic-per-category', 1))
    .option('--mcq <file>', 'JSONL of {question, choices, answer} for the utility suite')
    .option('--prompt-column <name>', 'CSV column with the prompt')
    .option('--response-column <name>', 'CSV column with the response')
    .option('--label-column <name>', 'CSV column with the label')
    .option('--limit <n>', 'at most n harmful and n benign conversations', integer('limit', 1))
    .option('--suite <names...>', 'suites, comma-separated: detection,sampling,prefill,long-context,suppression,utility,embedding,gcg,finetune (default: the first six; the white-box attacks embedding, gcg and finetune when named)')
    .option('--samples <n>', 'sampling attack: answers per harmful prompt', integer('samples', 1))
    .option('--temperature <t>', 'sampling attack: temperature', number('temperature', 0))
    .option('--max-tokens <n>', 'most tokens per generated answer', integer('max-tokens', 1))
    .option('--prefill-k <list>', 'prefill attack: answer-start lengths, e.g. 2,4,8,16')
    .option('--prefill-unit <unit>', "prefill lengths in 'words' or 'tokens'")
    .option('--context-k <list>', 'long-context attack: benign exchanges before the request, e.g. 0,2,4')
    .option('--epsilons <list>', 'embedding attack: radii relative to each prompt embedding norm, e.g. 0,0.05,0.1,0.2,0.5')
    .option('--embedding-steps <n>', 'embedding attack: PGD steps', integer('embedding-steps', 1))
    .option('--gcg-steps <n>', 'GCG attack: optimisation steps', integer('gcg-steps', 0))
    .option('--attack-items <n>', 'embedding and GCG attacks: harmful conversations attacked', integer('attack-items', 1))
    .option('--finetune-steps <n>', 'fine-tuning attack: LoRA steps on harmful answers', integer('finetune-steps', 1))
    .option('--threshold <p>', 'p(<rf>) at which an answer counts as flagged', number('threshold', 0, 1))
    .option('--dev-fraction <f>', 'share of labelled data used to choose a threshold', number('dev-fraction', 0, 1))
    .option('--dev-max-fpr <f>', 'false-flag rate the dev threshold aims at', number('dev-max-fpr', 0, 1))
    .option('--bootstrap <n>', 'bootstrap resamples per confidence interval of AUROC, AUPRC and TPR at FPR (rates use Wilson intervals)', integer('bootstrap', 1))
    .option('--judge <name>', "harmfulness judge: 'auto', 'synthetic' or 'non-refusal'")
    .option('--refusal-phrases <file>', 'refusal phrases, one per line (replaces the default list)')
    .option('--seed <n>', 'seed of sampling, splits and bootstraps', integer('seed', 0))
    .option('--batch-size <n>', 'sequences decoded together (default 16 on the CPU, 64 on a GPU)', integer('batch-size', 1))
    .option('-o, --out <dir>', 'output directory: report.json, report.md, plots, cache.json')
    .option('--no-png', 'write the plots as SVG only')
    .option('--device <device>', "where every model of the run runs, the fine-tuning attack's training too: 'cpu' (default), 'cuda' or 'cuda:N' (the CUDA build: npm run build:cuda)", device)
    .option('--kv-cache-mb <n>', 'KV cache of each detector of the run, MiB (default 2048)', integer('kv-cache-mb', 1))
    .option('--dtype <dtype>', "weights in the engine: 'f32' or 'bf16' (default: f32 on the CPU, bf16 on a GPU)", dtype)
    .option('--threads <n>', 'threads for native work', integer('threads', 1))
    .option('--chat-template-kwargs <json>', `${CHAT_TEMPLATE_KWARGS_HELP} (an adapter adds the ones it was trained with)`, templateKwargs)
    .option('--overwrite', 'replace report files in --out that redflag did not write (without it, such a folder is refused)')
    .action(async (flags: Record<string, unknown>) => {
      await runEval(flags);
    });

  program
    .command('study')
    .description('train a grid of variants over seeds, evaluate each, report mean ± 95% CI per cell (see README, Study)')
    .requiredOption('-c, --config <file>', 'JSON study config')
    .option('-o, --out <dir>', 'output directory (replaces the config\'s "out")')
    .option('--threads <n>', 'threads for native work', integer('threads', 1))
    .option('--overwrite', 'replace report files in the output directory that redflag did not write')
    .action(async (flags: { config: string; out?: string; threads?: number; overwrite?: boolean }) => {
      await runStudyCommand(flags);
    });

  program
    .command('demo')
    .description('the end-to-end job on built-in defaults (no download): see README')
    .option('--out <dir>', 'working directory (default: a new temporary directory)')
    .option('--threads <n>', 'threads for native work', integer('threads', 1))
    .option('--small', 'a smaller, faster run')
    .option('--overwrite', 'use an --out directory that is not empty (the demo replaces what it writes there)')
    .option('--device <device>', 'where the adapters train, the detector answers and the evaluation runs: cpu, cuda or cuda:N (the language model trains on the CPU)', device, 'cpu')
    .action(async (flags: { out?: string; threads?: number; small?: boolean; device: DeviceSpec; overwrite?: boolean }) => {
      await runDemo(flags);
    });

  return program;
}

