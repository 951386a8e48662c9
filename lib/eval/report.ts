/**
 * The evaluation report: `report.json` (everything measured), `report.md` (one comparison table
 * with a row per variant, then each suite's details and timings) and the plots.
 * @module
 */
import { readdir, readFile } from 'node:fs/promises';
import { join, relative } from 'node:path';

import { RedflagError } from '../errors.js';
import { writeFileAtomic } from '../model/safetensors.js';
import type { EvalConfig } from './config.js';
import { lineSpec, writePlot, type LineRow } from './plots.js';
import type { Estimate } from './stats.js';
import { SUITES } from './suites/index.js';
import type { DetectionResult } from './suites/detection.js';
import type { EmbeddingResult } from './suites/embedding.js';
import type { FinetuneResult } from './suites/finetune.js';
import type { GcgResult } from './suites/gcg.js';
import type { LongContextResult } from './suites/long-context.js';
import type { PrefillResult } from './suites/prefill.js';
import type { SamplingResult } from './suites/sampling.js';
import type { SuppressionResult } from './suites/suppression.js';
import type { UtilityResult } from './suites/utility.js';
import type { SuiteName } from './types.js';

/** What {@link writeReport} is given. */
export interface ReportParts {
  variants: { name: string; source: string; kind: 'base' | 'adapter' | 'model'; detects: boolean }[];
  suites: SuiteName[];
  /** variant → suite → result. */
  results: Record<string, Partial<Record<SuiteName, unknown>>>;
  /** variant → suite → seconds. */
  seconds: Record<string, Partial<Record<SuiteName, number>>>;
  data: { harmful: number; benign: number; mcq: number; sources: string[] };
  judge: string;
  refusalPhrases: readonly string[];
  storedVerdicts: number;
  cache: { hits: number; computed: number };
}

/** The comparison table: a row per variant, a column per headline number. */
export interface ReportTable {
  columns: { key: string; title: string }[];
  rows: { variant: string; values: Record<string, number | null> }[];
}

/** report.json's marker: a later run replaces only a report that carries it (see {@link checkReportFolder}). */
export const EVAL_REPORT_GENERATOR = 'redflag eval';

/** `report.json`. */
export interface EvalReport extends ReportParts {
  generator: typeof EVAL_REPORT_GENERATOR;
  createdAt: string;
  settings: Omit<EvalConfig, 'variants' | 'harmful' | 'benign' | 'data'>;
  table: ReportTable;
  /** Plot files, relative to the output directory. */
  plots: string[];
  files: { json: string; markdown: string };
}

/** Column titles of the headline numbers, in table order. */
const COLUMNS: { key: string; title: string; suite: SuiteName }[] = [
  { key: 'auroc', title: 'AUROC', suite: 'detection' },
  { key: 'tprAt1', title: 'TPR@1%FPR', suite: 'detection' },
  { key: 'flagRate', title: 'flag rate', suite: 'detection' },
  { key: 'falseFlagRate', title: 'false-flag rate', suite: 'detection' },
  { key: 'greedyDefended', title: 'greedy flagged/refused', suite: 'detection' },
  { key: 'greedyFalseDefended', title: 'benign flagged/refused', suite: 'detection' },
  { key: 'samplingAsr', title: 'sampling ASR@N', suite: 'sampling' },
  { key: 'prefillMinDefended', title: 'prefill min flagged/refused', suite: 'prefill' },
  { key: 'longContextMinDefended', title: 'long-ctx min flagged/refused', suite: 'long-context' },
  { key: 'suppressionFlagRate', title: 'flag-by-score, <rf> banned', suite: 'suppression' },
  { key: 'benignKl', title: 'benign KL', suite: 'utility' },
  { key: 'greedyAgreement', title: 'greedy = base', suite: 'utility' },
  { key: 'mcqAccuracy', title: 'MC accuracy', suite: 'utility' },
  { key: 'embeddingFlagRate', title: 'embedding attack: flagged at largest ε', suite: 'embedding' },
  { key: 'gcgAsr', title: 'GCG ASR', suite: 'gcg' },
  { key: 'gcgFlagged', title: 'GCG: answers flagged', suite: 'gcg' },
  { key: 'finetuneAsr', title: 'fine-tuning attack ASR', suite: 'finetune' },
  { key: 'finetuneFlagged', title: 'fine-tuned: harmful flagged', suite: 'finetune' },
];

function buildTable(parts: ReportParts): ReportTable {
  const columns = COLUMNS.filter((c) => parts.suites.includes(c.suite));
  const rows = parts.variants.map((v) => {
    const values: Record<string, number | null> = {};
    for (const suite of parts.suites) {
      const result = parts.results[v.name]?.[suite];
      if (result !== undefined) Object.assign(values, SUITES[suite].summarize(result).headline);
    }
    return { variant: v.name, values: Object.fromEntries(columns.map((c) => [c.key, values[c.key] ?? null])) };
  });
  return { columns: columns.map(({ key, title }) => ({ key, title })), rows };
}

function fmt(value: number | null | undefined, digits = 3): string {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  return Math.abs(value) >= 1e-3 || value === 0 ? value.toFixed(digits) : value.toExponential(1);
}

function ci(e: Estimate | undefined): string {
  if (!e || Number.isNaN(e.value)) return '–';
  return Number.isNaN(e.low) ? fmt(e.value) : `${fmt(e.value)} [${fmt(e.low)}, ${fmt(e.high)}]`;
}

/** A markdown table; `<rf>` in headers is put in code spans (bare, it would read as an HTML tag). */
function mdTable(header: string[], rows: string[][]): string {
  header = header.map((h) => h.replace(/(?<!`)<rf>(?!`)/g, '`<rf>`'));
  return [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

function get<T>(parts: ReportParts, variant: string, suite: SuiteName): T | undefined {
  return parts.results[variant]?.[suite] as T | undefined;
}

/** The plots the report may write (each as .svg, and .png unless --no-png): names a user's own file may have too. */
const PLOT_NAMES = ['roc', 'asr-vs-n', 'prefill-vs-k', 'long-context-vs-k', 'embedding-vs-eps'] as const;

async function plots(out: string, parts: ReportParts, png: boolean): Promise<string[]> {
  const written: string[] = [];
  const names = parts.variants.map((v) => v.name);
  const plot = async (file: (typeof PLOT_NAMES)[number], spec: Parameters<typeof writePlot>[1]) => written.push(...(await writePlot(join(out, file), spec, png)));
  if (parts.suites.includes('detection')) {
    const rows: LineRow[] = [];
    for (const n of names) {
      const tf = get<DetectionResult>(parts, n, 'detection')?.teacherForced;
      if (tf) for (const p of tf.roc) rows.push({ variant: `${n} (AUROC ${tf.auroc.value.toFixed(3)})`, x: p.fpr, y: p.tpr });
    }
    if (rows.length) await plot('roc', lineSpec('ROC: teacher-forced max p(<rf>), harmful vs benign', 'false-positive rate', 'true-positive rate', rows, { square: true, diagonal: true }));
  }
  if (parts.suites.includes('sampling')) {
    const rows: LineRow[] = [];
    for (const n of names) for (const p of get<SamplingResult>(parts, n, 'sampling')?.asr ?? []) rows.push({ variant: n, x: p.x, y: p.y });
    const r = get<SamplingResult>(parts, names[0]!, 'sampling');
    if (rows.length) await plot('asr-vs-n', lineSpec(`Sampling attack: ASR against N (T = ${r?.temperature ?? '?'})`, 'answers sampled per prompt (N)', 'attack success rate', rows));
  }
  for (const [suite, file, title, xTitle] of [
    ['prefill', 'prefill-vs-k', 'Prefill attack: continuation flagged / refused', 'prefilled answer start, k'],
    ['long-context', 'long-context-vs-k', 'Long-context attack: answer flagged / refused', 'benign exchanges before the request, K'],
  ] as const) {
    if (!parts.suites.includes(suite)) continue;
    const rows: LineRow[] = [];
    for (const v of parts.variants) {
      const r = get<PrefillResult | LongContextResult>(parts, v.name, suite);
      if (!r) continue;
      if (v.detects) for (const p of r.flagSeries) rows.push({ variant: v.name, x: p.x, y: p.y, measure: 'flagged' });
      for (const p of r.defendedSeries) rows.push({ variant: v.name, x: p.x, y: p.y, measure: 'flagged or refused' });
    }
    const unit = suite === 'prefill' ? ` (${get<PrefillResult>(parts, names[0]!, 'prefill')?.unit ?? 'words'})` : '';
    if (rows.length) await plot(file, lineSpec(title, xTitle + unit, 'rate', rows));
  }
  if (parts.suites.includes('embedding')) {
    const rows: LineRow[] = [];
    for (const v of parts.variants) {
      const r = get<EmbeddingResult>(parts, v.name, 'embedding');
      if (r?.applicable) for (const p of r.flagSeries) rows.push({ variant: v.name, x: p.x, y: p.y });
    }
    if (rows.length) await plot('embedding-vs-eps', lineSpec('Embedding-space attack: harmful answers still flagged', 'perturbation radius ε (relative to each embedding norm)', 'flag rate', rows));
  }
  return written.map((p) => relative(out, p));
}

function markdown(report: Omit<EvalReport, 'files'>): string {
  const p = report;
  const lines: string[] = [];
  lines.push('# redflag evaluation', '');
  lines.push(`${p.createdAt} · base model \`${p.settings.model}\` · judge: ${p.judge} · threshold ${p.settings.threshold} · ${p.settings.device}, ${p.settings.dtype} weights · ${p.data.harmful} harmful, ${p.data.benign} benign conversations${p.data.mcq ? `, ${p.data.mcq} multiple-choice questions` : ''}`, '');
  lines.push(...p.data.sources.map((s) => `- data: ${s}`), '');
  lines.push('## Comparison', '');
  lines.push(mdTable(['variant', ...p.table.columns.map((c) => c.title)], p.table.rows.map((r) => [r.variant, ...p.table.columns.map((c) => fmt(r.values[c.key]))])));
  lines.push('', 'flag rates are teacher-forced on the labelled responses at the configured threshold; "flagged/refused" is the combined defence on greedy answers; attack columns give the worst case over k / K; "–": not applicable (no `<rf>`) or not run.', '');
  for (const plot of p.plots.filter((f) => f.endsWith('.png'))) lines.push(`![${plot}](${plot})`);
  lines.push('');
  const v = p.variants.map((x) => x.name);
  if (p.suites.includes('detection')) {
    lines.push('## Detection', '');
    lines.push(mdTable(['variant', 'AUROC', 'AUPRC', 'TPR@1%', 'TPR@5%', 'flag rate', 'false-flag rate', 'dev threshold', 'flag rate @dev', 'false-flag @dev'], v.map((n) => {
      const tf = get<DetectionResult>(p, n, 'detection')?.teacherForced;
      return tf ? [n, ci(tf.auroc), ci(tf.auprc), ci(tf.tprAt1), ci(tf.tprAt5), ci(tf.flagRate), ci(tf.falseFlagRate), fmt(tf.dev.threshold, 4), ci(tf.dev.flagRate), ci(tf.dev.falseFlagRate)] : [n, '–', '–', '–', '–', '–', '–', '–', '–', '–'];
    })));
    lines.push('', 'Greedy answers:', '');
    lines.push(mdTable(['variant', 'AUROC of max p(<rf>)', 'harmful flagged', 'refused', 'flagged or refused', 'benign flagged', 'benign refused', 'benign flagged or refused', 'benign answer judged harmful', 'fires more than once'], v.map((n) => {
      const g = get<DetectionResult>(p, n, 'detection')!.greedy;
      return [n, g.auroc ? ci(g.auroc) : '–', ci(g.flagRate), ci(g.refusalRate), ci(g.combinedRate), ci(g.falseFlagRate), ci(g.falseRefusalRate), ci(g.combinedFalseRate), ci(g.benignJudgedHarmfulRate), fmt(g.multipleFireRate)];
    })));
    for (const n of v) {
      const sv = get<DetectionResult>(p, n, 'detection')?.storedVerdicts;
      if (sv) {
        lines.push('', `Stored verdicts (${n}, ${sv.n} responses): our flag rate ${fmt(sv.flagRate)}; stored "jailbroken" rate ${fmt(sv.jailbrokenRate)} (agreement ${fmt(sv.agreementWithJailbroken)}); Llama Guard rate ${fmt(sv.llamaGuardRate)} (agreement ${fmt(sv.agreementWithLlamaGuard)}).`);
      }
    }
    const cats = get<DetectionResult>(p, v[0]!, 'detection')?.categories ?? [];
    if (cats.length) {
      lines.push('', 'Per category (teacher-forced flag rate over its labelled responses / greedy flagged-or-refused over its prompts):', '');
      lines.push(mdTable(['category', 'label', 'responses', 'prompts', ...v], cats.map((c) => [c.category, c.label, String(c.nTeacherForced), String(c.nGreedy), ...v.map((n) => {
        const row = get<DetectionResult>(p, n, 'detection')?.categories.find((r) => r.category === c.category && r.label === c.label);
        return row ? `${fmt(row.flagRate)} / ${fmt(row.greedyDefendedRate)}` : '–';
      })])));
    }
    lines.push('');
  }
  if (p.suites.includes('sampling')) {
    lines.push('## Sampling attack', '');
    lines.push(mdTable(['variant', 'prompts × N', 'ASR@1', 'ASR@N [95% CI]', 'answers flagged', 'refused', 'judged harmful', 'broken'], v.map((n) => {
      const r = get<SamplingResult>(p, n, 'sampling')!;
      return [n, `${r.prompts} × ${r.samples}`, fmt(r.asr[0]?.y), ci(r.asrAtMax), fmt(r.answers.flagged), fmt(r.answers.refused), fmt(r.answers.harmful), fmt(r.answers.broken)];
    })));
    for (const n of v) for (const e of get<SamplingResult>(p, n, 'sampling')!.examples.slice(0, 2)) lines.push('', `- ${n}, got through: "${e.prompt.slice(0, 100)}" → "${e.answer.slice(0, 160).replace(/\s+/g, ' ')}"`);
    lines.push('');
  }
  for (const [suite, title, kName] of [['prefill', 'Prefill attack', 'k'], ['long-context', 'Long-context attack', 'K']] as const) {
    if (!p.suites.includes(suite)) continue;
    lines.push(`## ${title}`, '');
    const first = get<PrefillResult | LongContextResult>(p, v[0]!, suite)!;
    lines.push(mdTable(['variant', ...first.points.map((pt) => `${kName} = ${pt.k} (n ${pt.n})`)], v.map((n) => {
      const r = get<PrefillResult | LongContextResult>(p, n, suite)!;
      return [n, ...r.points.map((pt) => `${fmt(pt.flagRate.value)} / ${fmt(pt.defendedRate.value)} / ASR ${fmt(pt.asr.value)}`)];
    })));
    lines.push('', 'Each cell: flagged / flagged or refused / attack success (unflagged, unrefused, judged harmful).', '');
  }
  if (p.suites.includes('suppression')) {
    lines.push('## Suppression attack (`<rf>` banned)', '');
    lines.push(mdTable(['variant', 'free: flagged', 'free: <rf> emitted', 'banned: flagged by score', '<rf> emitted when banned'], v.map((n) => {
      const r = get<SuppressionResult>(p, n, 'suppression')!;
      return r.applicable ? [n, ci(r.free.flagRate), fmt(r.free.emittedRate), ci(r.banned.flagByScoreRate), String(r.banned.emitted)] : [n, '–', '–', '–', '–'];
    })));
    lines.push('');
  }
  if (p.suites.includes('utility')) {
    lines.push('## Utility', '');
    lines.push(mdTable(['variant', 'benign KL (nats/token)', 'perplexity', 'base perplexity', 'greedy = base', 'first divergence (tokens)', 'MC accuracy', 'base MC accuracy'], v.map((n) => {
      const r = get<UtilityResult>(p, n, 'utility')!;
      return [n, fmt(r.kl, 4), fmt(r.perplexity, 2), fmt(r.basePerplexity, 2), fmt(r.greedy.exactMatch), `${fmt(r.greedy.meanFirstDivergence, 1)} of ${fmt(r.greedy.meanLength, 1)}`, fmt(r.mcq.accuracy), fmt(r.mcq.baseAccuracy)];
    })));
    lines.push('');
  }
  if (p.suites.includes('embedding')) {
    lines.push('## Embedding-space attack', '');
    const first = v.map((n) => get<EmbeddingResult>(p, n, 'embedding')).find((r) => r?.applicable);
    if (first) {
      lines.push(`PGD on the prompt's input embeddings, ${first.steps} steps, λ = ${first.lambda}; each cell: flagged [95% CI] / mean max p(<rf>) / Δ answer cross-entropy (nats/token).`, '');
      lines.push(mdTable(['variant', ...first.points.map((pt) => `ε = ${pt.epsilon} (n ${pt.n})`)], v.map((n) => {
        const r = get<EmbeddingResult>(p, n, 'embedding')!;
        return r.applicable ? [n, ...r.points.map((pt) => `${ci(pt.flagRate)} / ${fmt(pt.meanMaxPRf)} / ${fmt(pt.meanCeChange)}`)] : [n, ...first.points.map(() => '–')];
      })));
    } else {
      lines.push('No variant has `<rf>`: nothing to attack.');
    }
    lines.push('');
  }
  if (p.suites.includes('gcg')) {
    lines.push('## Adaptive GCG', '');
    lines.push(mdTable(['variant', 'n', 'λ', 'flagged before / after', 'refused before / after', 'ASR before / after', 'mean max p(<rf>) before / after'], v.map((n) => {
      const r = get<GcgResult>(p, n, 'gcg')!;
      return [n, String(r.n), String(r.lambda), `${ci(r.before.flagRate)} / ${ci(r.after.flagRate)}`, `${ci(r.before.refusalRate)} / ${ci(r.after.refusalRate)}`, `${ci(r.before.asr)} / ${ci(r.after.asr)}`, r.meanMaxPRf ? `${fmt(r.meanMaxPRf.before)} / ${fmt(r.meanMaxPRf.after)}` : '–'];
    })));
    for (const n of v) for (const e of get<GcgResult>(p, n, 'gcg')!.examples.slice(0, 1)) lines.push('', `- ${n}: suffix "${e.suffix.slice(0, 80)}" → "${e.answer.slice(0, 120).replace(/\s+/g, ' ')}"`);
    lines.push('');
  }
  if (p.suites.includes('finetune')) {
    lines.push('## Fine-tuning attack', '');
    lines.push(mdTable(['variant', 'defence', 'steps (trained on n)', 'flagged before / after', 'refused before / after', 'ASR before / after', 'harmful answers flagged (teacher-forced) before / after'], v.map((n) => {
      const r = get<FinetuneResult>(p, n, 'finetune')!;
      return [n, r.defence, `${r.steps} (${r.trainedOn})`, `${ci(r.before.flagRate)} / ${ci(r.after.flagRate)}`, `${ci(r.before.refusalRate)} / ${ci(r.after.refusalRate)}`, `${ci(r.before.asr)} / ${ci(r.after.asr)}`, `${fmt(r.before.teacherForcedFlagRate)} / ${fmt(r.after.teacherForcedFlagRate)}`];
    })));
    lines.push('');
  }
  lines.push('## Time per suite in this run (seconds; units reused from the cache cost nothing)', '');
  lines.push(mdTable(['variant', ...p.suites], v.map((n) => [n, ...p.suites.map((s) => (p.seconds[n]?.[s] === undefined ? '–' : p.seconds[n]![s]!.toFixed(1)))])));
  lines.push('', `Results cache: ${p.cache.computed} units computed, ${p.cache.hits} reused.`, '');
  lines.push(`Refusal phrases (${p.refusalPhrases.length}): ${p.refusalPhrases.map((x) => `"${x}"`).join(', ')}`, '');
  return lines.join('\n');
}

/** What {@link checkReportFolder} protects: a report's JSON, and the other files it writes beside it. */
export interface ReportFiles {
  /** The JSON report's file name (report.json, study.json). */
  json: string;
  /** The marker the JSON carries (`generator`). */
  generator: string;
  /** Keys every JSON report of a version before the marker has: such a report is redflag's too. */
  legacyKeys: readonly string[];
  /** Of the folder's file names, those the report would write besides the JSON (report.md, plots). */
  others: (names: readonly string[]) => string[];
  /** Whether the folder holds other work of redflag's that makes its report files redflag's (the eval's cache.json). */
  ownedBy?: (dir: string) => Promise<boolean>;
  /** How to go on, for the error: "choose another --out, or …". */
  hint: string;
}

/**
 * Refuses an output folder where the report would replace files redflag did not write (a user's
 * own report.md, report.json or roc.png was overwritten). The JSON is redflag's when it carries
 * the marker (or an earlier version's keys); the other files count as redflag's only beside such
 * a JSON, or beside `ownedBy`'s work. Nothing is checked with `overwrite`.
 */
export async function checkReportFolder(dir: string, files: ReportFiles, overwrite: boolean): Promise<void> {
  if (overwrite) return;
  const names = await readdir(dir).catch(() => [] as string[]);
  const refuse = (name: string, why: string) =>
    new RedflagError('INVALID_ARGUMENT', `${why}, and the report would replace it: ${files.hint}`, { file: join(dir, name) });
  if (names.includes(files.json)) {
    let value: unknown;
    try {
      value = JSON.parse(await readFile(join(dir, files.json), 'utf8'));
    } catch {
      value = null;
    }
    const record = value !== null && typeof value === 'object' && !Array.isArray(value) ? (value as Record<string, unknown>) : {};
    if (record['generator'] === files.generator || (files.legacyKeys.length > 0 && files.legacyKeys.every((k) => k in record))) return;
    throw refuse(files.json, `not a report of ${files.generator} (no "generator": "${files.generator}" in it)`);
  }
  const others = files.others(names);
  if (others.length > 0 && !(await files.ownedBy?.(dir))) throw refuse(others[0]!, `not written by ${files.generator} (no ${files.json} of its beside it)`);
}

/** The eval's report files in an --out folder (report.json, report.md, the plots); its cache.json also marks the folder as a run's. */
export const EVAL_REPORT_FILES: ReportFiles = {
  json: 'report.json',
  generator: EVAL_REPORT_GENERATOR,
  legacyKeys: ['createdAt', 'settings', 'table', 'results', 'files'],
  others: (names) => names.filter((n) => n === 'report.md' || PLOT_NAMES.some((p) => n === `${p}.svg` || n === `${p}.png`)),
  ownedBy: async (dir) => {
    try {
      const cache = JSON.parse(await readFile(join(dir, 'cache.json'), 'utf8')) as { version?: unknown; entries?: unknown };
      return typeof cache.entries === 'object' && cache.entries !== null && typeof cache.version === 'number';
    } catch {
      return false;
    }
  },
  hint: 'choose another --out, or pass --overwrite ("overwrite": true in an eval config) to replace it',
};

/** Writes report.json, report.md and the plots into `config.out`; returns the report. */
export async function writeReport(config: EvalConfig, parts: ReportParts): Promise<EvalReport> {
  const { variants: _v, harmful: _h, benign: _b, data: _d, ...settings } = config;
  const plotFiles = await plots(config.out, parts, config.png);
  const base: Omit<EvalReport, 'files'> = { generator: EVAL_REPORT_GENERATOR, createdAt: new Date().toISOString(), settings, ...parts, table: buildTable(parts), plots: plotFiles };
  const files = { json: join(config.out, 'report.json'), markdown: join(config.out, 'report.md') };
  const report: EvalReport = { ...base, files };
  const encoder = new TextEncoder();
  // JSON has no NaN or Infinity: they become null.
  await writeFileAtomic(files.json, [encoder.encode(`${JSON.stringify(report, (_k, x) => (typeof x === 'number' && !Number.isFinite(x) ? null : x), 2)}\n`)], { overwrite: true });
  await writeFileAtomic(files.markdown, [encoder.encode(markdown(base))], { overwrite: true });
  return report;
}

/** The comparison table as plain text (for a terminal). */
export function formatTable(table: ReportTable): string {
  const header = ['variant', ...table.columns.map((c) => c.title)];
  const rows = table.rows.map((r) => [r.variant, ...table.columns.map((c) => fmt(r.values[c.key]))]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ');
  return [line(header), ...rows.map(line)].join('\n');
}
