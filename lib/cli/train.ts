/**
 * `redflag train`: flags and config file to a validated config, a progress bar on a terminal
 * (plain lines otherwise), and Ctrl-C that checkpoints and exits cleanly.
 * @module
 */
import { SingleBar } from 'cli-progress';

import { RedflagError } from '../errors.js';
import { loadTrainConfig, parseTrainConfig, type TrainConfig } from '../train/config.js';
import { train, type StepInfo } from '../train/trainer.js';

function fmtTime(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
}

function lossText(info: StepInfo): string {
  const l = info.loss;
  const parts = [`loss ${l.total.toFixed(4)}`];
  if (l.benign) parts.push(`benign ${l.benign.toFixed(4)}`);
  if (l.redFlag) parts.push(`rf ${l.redFlag.toFixed(4)}`);
  if (l.after) parts.push(`after ${l.after.toFixed(4)}`);
  if (l.ce) parts.push(`ce ${l.ce.toFixed(4)}`);
  return parts.join(' ');
}

/** The flag that sets each config field the flags can set, so an error about a field names the flag a user typed. */
const FLAG_OF_FIELD: Record<string, string> = {
  model: '--model',
  output: '--output',
  objective: '--objective',
  mode: '--mode',
  steps: '--steps',
  batchSize: '--batch-size',
  gradAccum: '--grad-accum',
  maxTokens: '--max-tokens',
  seed: '--seed',
  evalEvery: '--eval-every',
  checkpointEvery: '--checkpoint-every',
  merge: '--merge',
  'adversarial.epsilon': '--adv-epsilon',
  'adversarial.steps': '--adv-steps',
  'loss.rfPosition': '--rf-position',
  flagCategories: '--flag-categories',
  categoryMap: '--category-map',
  device: '--device',
  recompute: '--recompute',
  dataParallel: '--world-size',
  'dataParallel.worldSize': '--world-size',
  'dataParallel.rank': '--process-rank',
  'dataParallel.idFile': '--group-file',
  dtype: '--dtype',
  threads: '--threads',
  chatTemplateKwargs: '--chat-template-kwargs',
  'lora.rank': '--rank',
  'lora.alpha': '--alpha',
  'lora.targets': '--targets',
  'optimizer.lr': '--lr',
};
const flagOfField = (field: string): string | undefined => FLAG_OF_FIELD[field] ?? (/^lora\.targets\.\d+$/.test(field) ? '--targets' : undefined);

/** Builds the config from flags (and the config file they name). */
export async function configFromFlags(flags: Record<string, unknown>): Promise<TrainConfig> {
  const o: Record<string, unknown> = {};
  const set = (key: string, value: unknown) => {
    if (value !== undefined) o[key] = value;
  };
  set('model', flags['model']);
  set('output', flags['output']);
  const columns = {
    ...(flags['promptColumn'] ? { promptColumn: flags['promptColumn'] } : {}),
    ...(flags['responseColumn'] ? { responseColumn: flags['responseColumn'] } : {}),
    ...(flags['labelColumn'] ? { labelColumn: flags['labelColumn'] } : {}),
  };
  const files = [
    ...((flags['harmful'] as string[] | undefined) ?? []).map((file) => ({ file, label: 'harmful', ...columns })),
    ...((flags['benign'] as string[] | undefined) ?? []).map((file) => ({ file, label: 'benign', ...columns })),
    ...((flags['data'] as string[] | undefined) ?? []).map((file) => ({ file, ...columns })),
  ];
  if (flags['synthetic']) set('data', 'synthetic');
  else if (files.length) set('data', files);
  set('skipInvalid', flags['skipInvalid']);
  set('objective', flags['objective']);
  set('mode', flags['mode']);
  set('steps', flags['steps']);
  set('batchSize', flags['batchSize']);
  set('gradAccum', flags['gradAccum']);
  set('maxTokens', flags['maxTokens']);
  set('seed', flags['seed']);
  set('evalEvery', flags['evalEvery']);
  set('checkpointEvery', flags['checkpointEvery']);
  set('merge', flags['merge']);
  set('overwrite', flags['overwrite']);
  if (flags['adversarial'] !== undefined) {
    if (flags['adversarial'] !== 'embedding') throw new RedflagError('INVALID_ARGUMENT', `--adversarial must be 'embedding', got ${JSON.stringify(flags['adversarial'])}`);
    o['adversarial'] = { ...(flags['advEpsilon'] !== undefined ? { epsilon: flags['advEpsilon'] } : {}), ...(flags['advSteps'] !== undefined ? { steps: flags['advSteps'] } : {}) };
  } else if (flags['advEpsilon'] !== undefined || flags['advSteps'] !== undefined) {
    throw new RedflagError('INVALID_ARGUMENT', '--adv-epsilon and --adv-steps need --adversarial embedding');
  }
  if (flags['rfPosition'] !== undefined) o['loss'] = { ...((o['loss'] as object) ?? {}), rfPosition: flags['rfPosition'] };
  if (typeof flags['flagCategories'] === 'string') {
    const list = flags['flagCategories'].split(',').map((s) => s.trim()).filter(Boolean);
    o['flagCategories'] = list.length === 1 && list[0] === 'auto' ? 'auto' : list;
  }
  set('categoryMap', flags['categoryMap']);
  set('device', flags['device']);
  set('recompute', flags['recompute']);
  if (flags['worldSize'] !== undefined || flags['processRank'] !== undefined || flags['groupFile'] !== undefined) {
    if (flags['worldSize'] === undefined || flags['groupFile'] === undefined) {
      throw new RedflagError('INVALID_ARGUMENT', 'data-parallel training needs --world-size and --group-file (and --process-rank on every process but rank 0)');
    }
    o['dataParallel'] = { worldSize: flags['worldSize'], rank: flags['processRank'] ?? 0, idFile: flags['groupFile'] };
  }
  set('dtype', flags['dtype']);
  set('threads', flags['threads']);
  set('chatTemplateKwargs', flags['chatTemplateKwargs']);
  const lora: Record<string, unknown> = {};
  if (flags['rank'] !== undefined) lora['rank'] = flags['rank'];
  if (flags['alpha'] !== undefined) lora['alpha'] = flags['alpha'];
  if (flags['targets'] !== undefined) lora['targets'] = flags['targets'];
  if (flags['lr'] !== undefined) o['optimizer'] = { lr: flags['lr'] };
  if (typeof flags['config'] === 'string') {
    const base = await loadTrainConfig(flags['config']);
    return parseTrainConfig(
      { ...base, ...o, lora: { ...base.lora, ...lora }, optimizer: { ...base.optimizer, ...((o['optimizer'] as object) ?? {}) }, loss: { ...base.loss, ...((o['loss'] as object) ?? {}) } },
      flags['config'],
      flagOfField,
    );
  }
  if (Object.keys(lora).length) o['lora'] = lora;
  if (o['model'] === undefined || o['output'] === undefined || o['data'] === undefined) {
    throw new RedflagError('INVALID_ARGUMENT', 'train needs --model, --output and data (--harmful/--benign/--data or --synthetic), or --config');
  }
  return parseTrainConfig(o, 'flags', flagOfField);
}

export async function runTrain(flags: Record<string, unknown>): Promise<void> {
  const config = await configFromFlags(flags);
  const controller = new AbortController();
  let interrupted = false;
  const onSigint = () => {
    if (interrupted) process.exit(130); // a second Ctrl-C does not wait for the checkpoint
    interrupted = true;
    process.stderr.write('\nstopping after this step: writing a checkpoint (Ctrl-C again to quit now)\n');
    controller.abort(new RedflagError('ABORTED', 'interrupted: the checkpoint in the output directory resumes the run (--resume)'));
  };
  process.on('SIGINT', onSigint);
  const tty = Boolean(process.stderr.isTTY);
  const bar = tty
    ? new SingleBar({ format: 'train [{bar}] {value}/{total} | {loss} | {speed} tok/s | ETA {eta_t}', hideCursor: true, stream: process.stderr })
    : null;
  let barStarted = false;
  try {
    const result = await train(config, {
      resume: Boolean(flags['resume']),
      signal: controller.signal,
      log: (m) => (bar && barStarted ? bar.update({}) : undefined, process.stderr.write(`${m}\n`)),
      onStep: (info) => {
        const payload = { loss: lossText(info), speed: info.tokensPerSecond.toFixed(0), eta_t: fmtTime(info.etaSeconds) };
        if (bar) {
          if (!barStarted) {
            bar.start(info.steps, info.step - 1, payload);
            barStarted = true;
          }
          bar.update(info.step, payload);
        } else if (info.step === 1 || info.step % 10 === 0 || info.step === info.steps) {
          process.stderr.write(`step ${info.step}/${info.steps} ${payload.loss} lr ${info.lr.toExponential(2)} ${payload.speed} tok/s ETA ${payload.eta_t}\n`);
        }
      },
      onEval: (step, r) => {
        const line = `eval @${step}: harmful flagged ${(100 * r.harmfulFlagRate).toFixed(1)}% (${r.harmful}), benign false flags ${(100 * r.benignFalseFlagRate).toFixed(1)}% (${r.benign}), benign KL ${r.benignKl.toExponential(2)}`;
        if (bar) bar.update({});
        process.stderr.write(`${tty ? '\n' : ''}${line}\n`);
      },
    });
    bar?.stop();
    console.log(JSON.stringify({ steps: result.steps, saved: result.saved, loss: result.lastLoss, eval: result.finalEval && { harmfulFlagRate: result.finalEval.harmfulFlagRate, benignFalseFlagRate: result.finalEval.benignFalseFlagRate, benignKl: result.finalEval.benignKl } }, null, 2));
  } finally {
    bar?.stop();
    process.off('SIGINT', onSigint);
  }
}
