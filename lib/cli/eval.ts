/**
 * `redflag eval`: flags (and an optional JSON config file) to a validated evaluation config,
 * progress bars on stderr (plain lines when stderr is not a terminal), Ctrl-C that stops after
 * the current batch (the results cache keeps everything finished), and the comparison table on
 * stdout.
 * @module
 */
import { readFile } from 'node:fs/promises';

import { SingleBar } from 'cli-progress';

import { RedflagError } from '../errors.js';
import { parseJsonText } from '../model/config.js';
import { parseEvalConfig, type EvalConfig } from '../eval/config.js';
import { evaluate, type EvalProgress } from '../eval/evaluate.js';
import { formatTable } from '../eval/report.js';

/** `NAME=PATH` (PATH: an adapter directory, a model directory or `base`); a bare `base` names itself. */
export function parseVariantFlag(value: string, index: number): { name: string; source: string } {
  if (value === 'base') return { name: 'base', source: 'base' };
  const eq = value.indexOf('=');
  if (eq <= 0 || eq === value.length - 1) {
    throw new RedflagError('INVALID_ARGUMENT', `--variant #${index + 1} must be NAME=PATH (an adapter or model directory, or "base"), got ${JSON.stringify(value)}`);
  }
  return { name: value.slice(0, eq), source: value.slice(eq + 1) };
}

/** A comma-separated list of integers, naming the flag when one is not. */
function integers(flag: string, value: unknown): number[] | undefined {
  if (value === undefined) return undefined;
  return numbers(flag, value, 'integers', Number.isInteger);
}

/** A comma-separated list of numbers >= 0 that `ok` accepts; an empty item is a mistake, not a 0. */
function numbers(flag: string, value: unknown, what: string, ok: (n: number) => boolean): number[] {
  return String(value).split(',').map((p) => {
    const n = Number(p.trim());
    if (p.trim() === '' || !ok(n) || n < 0) throw new RedflagError('INVALID_ARGUMENT', `${flag} must be a comma-separated list of ${what} >= 0, got ${JSON.stringify(String(value))}`);
    return n;
  });
}

/** Builds the config from flags (over the config file they name). */
export async function evalConfigFromFlags(flags: Record<string, unknown>): Promise<EvalConfig> {
  let base: Record<string, unknown> = {};
  if (typeof flags['config'] === 'string') {
    let text: string;
    try {
      text = await readFile(flags['config'], 'utf8');
    } catch (cause) {
      throw new RedflagError('NOT_FOUND', 'cannot read the eval config', { file: flags['config'], cause });
    }
    const json = parseJsonText(text, flags['config']);
    if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new RedflagError('INVALID_FILE', 'the eval config must be a JSON object', { file: flags['config'] });
    base = json as Record<string, unknown>;
  }
  const o: Record<string, unknown> = { ...base };
  const set = (key: string, value: unknown) => {
    if (value !== undefined) o[key] = value;
  };
  set('model', flags['model']);
  set('out', flags['out']);
  const variants = (flags['variant'] as string[] | undefined)?.map(parseVariantFlag);
  if (variants) set('variants', [{ name: 'base', source: 'base' }, ...variants.filter((v) => v.source !== 'base' || v.name !== 'base')]);
  const columns = {
    ...(flags['promptColumn'] ? { promptColumn: flags['promptColumn'] } : {}),
    ...(flags['responseColumn'] ? { responseColumn: flags['responseColumn'] } : {}),
    ...(flags['labelColumn'] ? { labelColumn: flags['labelColumn'] } : {}),
  };
  const files = (key: string) => (flags[key] as string[] | undefined)?.map((file) => ({ file, ...columns }));
  set('harmful', files('harmful'));
  set('benign', files('benign'));
  set('data', files('data'));
  // The synthetic split: --synthetic or the config file's; --synthetic-per-category sizes it.
  const perCategory = flags['syntheticPerCategory'] !== undefined ? { perCategory: flags['syntheticPerCategory'] } : {};
  if (flags['synthetic'] || (base['synthetic'] && flags['syntheticPerCategory'] !== undefined)) {
    o['synthetic'] = { ...((base['synthetic'] as object) ?? {}), ...perCategory };
  } else if (flags['syntheticPerCategory'] !== undefined) {
    throw new RedflagError('INVALID_ARGUMENT', '--synthetic-per-category sizes the synthetic split: add --synthetic (or "synthetic" in the config file)');
  }
  set('mcq', flags['mcq']);
  set('limit', flags['limit']);
  if (flags['suite'] !== undefined) {
    o['suites'] = (flags['suite'] as string[]).flatMap((s) => s.split(',')).map((s) => s.trim()).filter(Boolean);
  }
  set('samples', flags['samples']);
  set('temperature', flags['temperature']);
  set('maxTokens', flags['maxTokens']);
  set('prefillK', integers('--prefill-k', flags['prefillK']));
  set('prefillUnit', flags['prefillUnit']);
  set('contextK', integers('--context-k', flags['contextK']));
  // Attack budgets: flags over the config file's `attacks`.
  const attacks = { ...((base['attacks'] as Record<string, Record<string, unknown>> | undefined) ?? {}) };
  const budget = (attack: string, key: string, value: unknown) => {
    if (value !== undefined) attacks[attack] = { ...attacks[attack], [key]: value };
  };
  if (flags['epsilons'] !== undefined) {
    budget('embedding', 'epsilons', numbers('--epsilons', flags['epsilons'], 'numbers', Number.isFinite));
  }
  budget('embedding', 'steps', flags['embeddingSteps']);
  budget('embedding', 'items', flags['attackItems']);
  budget('gcg', 'items', flags['attackItems']);
  budget('gcg', 'steps', flags['gcgSteps']);
  budget('finetune', 'steps', flags['finetuneSteps']);
  if (Object.keys(attacks).length > 0) o['attacks'] = attacks;
  set('threshold', flags['threshold']);
  set('devFraction', flags['devFraction']);
  set('devMaxFpr', flags['devMaxFpr']);
  set('bootstrapResamples', flags['bootstrap']);
  set('seed', flags['seed']);
  set('batchSize', flags['batchSize']);
  set('judge', flags['judge']);
  if (typeof flags['refusalPhrases'] === 'string') {
    const text = await readFile(flags['refusalPhrases'], 'utf8').catch((cause: unknown) => {
      throw new RedflagError('NOT_FOUND', 'cannot read the refusal phrases (--refusal-phrases)', { file: flags['refusalPhrases'] as string, cause });
    });
    o['refusalPhrases'] = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l.length > 0 && !l.startsWith('#'));
  }
  set('device', flags['device']);
  if (flags['kvCacheMb'] !== undefined) o['kvCacheBytes'] = (flags['kvCacheMb'] as number) * 2 ** 20;
  set('dtype', flags['dtype']);
  set('threads', flags['threads']);
  set('chatTemplateKwargs', flags['chatTemplateKwargs']);
  if (flags['png'] === false) o['png'] = false;
  if (flags['overwrite'] === true) o['overwrite'] = true;
  if (o['model'] === undefined || o['out'] === undefined) throw new RedflagError('INVALID_ARGUMENT', 'eval needs --model and --out (or a --config naming them)');
  // Flag names in messages: the schema's fields map one-to-one to flags (camelCase → --kebab-case).
  return parseEvalConfig(o, typeof flags['config'] === 'string' ? `${flags['config']} (with flags)` : 'flags');
}

/** Runs `redflag eval`. */
export async function runEval(flags: Record<string, unknown>): Promise<void> {
  const config = await evalConfigFromFlags(flags);
  const controller = new AbortController();
  const onSigint = () => {
    process.stderr.write('\nstopping: finished units are in the results cache; run the same command again to resume\n');
    controller.abort(new RedflagError('ABORTED', 'interrupted: run the same command again to resume from the results cache'));
  };
  process.once('SIGINT', onSigint);
  const tty = Boolean(process.stderr.isTTY);
  let bar: SingleBar | null = null;
  const onProgress = (e: EvalProgress) => {
    if (e.phase === 'load') {
      process.stderr.write(`loading ${e.variant}\n`);
    } else if (e.phase === 'start') {
      if (tty) {
        bar = new SingleBar({ format: `${e.variant} ${e.suite} [{bar}] {value}/{total} | {duration}s`, hideCursor: true, stream: process.stderr });
        bar.start(Math.max(1, e.total), 0);
      }
    } else if (e.phase === 'progress') {
      if (bar) {
        bar.setTotal(Math.max(1, e.total));
        bar.update(e.done);
      }
    } else {
      bar?.update(Math.max(1, e.total));
      bar?.stop();
      bar = null;
      process.stderr.write(`${e.variant} ${e.suite}: done in ${(e.seconds ?? 0).toFixed(1)}s\n`);
    }
  };
  try {
    const report = await evaluate(config, { onProgress, signal: controller.signal });
    process.stdout.write(`${formatTable(report.table)}\n\n`);
    process.stdout.write(`report: ${report.files.markdown}, ${report.files.json}; plots: ${report.plots.join(', ') || 'none'}\n`);
  } finally {
    (bar as SingleBar | null)?.stop();
    process.off('SIGINT', onSigint);
  }
}
