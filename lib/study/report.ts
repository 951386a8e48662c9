/**
 * The study report: per cell, every metric's mean over the seeds with its Student-t 95%
 * confidence interval (one seed: the value alone). `study.json` holds everything (with each
 * seed's raw values), `study.md` a table of cells × metrics as `mean ± half-width`, and for each
 * numeric grid axis (the α weights, rfOffset, LoRA rank) a sensitivity plot: each metric against
 * the axis, error bars the 95% CI, a line per combination of the other axes.
 * @module
 */
import { join, relative } from 'node:path';

import type { TopLevelSpec } from 'vega-lite';

import { writePlot } from '../eval/plots.js';
import type { ReportFiles } from '../eval/report.js';
import { meanInterval, type MeanInterval } from '../eval/stats.js';
import { writeFileAtomic } from '../model/safetensors.js';
import type { StudyConfig, StudyPlan } from './config.js';
import type { CellResult } from './runner.js';

/** A metric's summary in one cell. */
export interface CellSummary extends MeanInterval {
  /** mean ∓ half-width (null with one seed or none). */
  low: number | null;
  high: number | null;
  /** Each seed's value, in the order of `seeds` (null: not measured or not applicable). */
  values: (number | null)[];
}

/** `study.json`. */
export interface StudyReport {
  generator: typeof STUDY_REPORT_FILES.generator;
  createdAt: string;
  config: StudyConfig;
  /** The base model the adapters were trained on. */
  model: string;
  seeds: number[];
  axes: [string, unknown[]][];
  /** Every metric measured, in table order. */
  metrics: { key: string; title: string }[];
  /** The metrics in the table and plots. */
  shown: string[];
  cells: {
    name: string;
    kind: 'grid' | 'variant';
    overrides: Record<string, unknown>;
    axes: Record<string, unknown>;
    summary: Record<string, CellSummary>;
    seconds: { train: number; eval: number };
  }[];
  plots: string[];
  files: { json: string; markdown: string };
}

/** A metric's mean and CI over the seeds' values (nulls left out). */
export function summarize(values: (number | null)[]): CellSummary {
  const m = meanInterval(values.filter((v): v is number => typeof v === 'number' && Number.isFinite(v)));
  return { ...m, low: m.halfWidth === null ? null : m.mean - m.halfWidth, high: m.halfWidth === null ? null : m.mean + m.halfWidth, values };
}

/** A number with `digits` decimals (a small nonzero one in exponent notation). */
function fmt(value: number | null | undefined, digits: number): string {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  if (value !== 0 && Math.abs(value) < 10 ** -digits) return value.toExponential(1);
  return value.toFixed(digits);
}

/** `mean ± half-width` (both to the mean's precision: 3 decimals, 1 from 10 up), the value alone for one seed, `–` for none. */
export function formatSummary(s: CellSummary | undefined): string {
  if (!s || s.n === 0) return '–';
  const digits = Math.abs(s.mean) >= 10 ? 1 : 3;
  return s.halfWidth === null ? fmt(s.mean, digits) : `${fmt(s.mean, digits)} ± ${fmt(s.halfWidth, digits)}`;
}

function mdTable(header: string[], rows: string[][]): string {
  header = header.map((h) => h.replace(/(?<!`)<rf>(?!`)/g, '`<rf>`'));
  return [`| ${header.join(' | ')} |`, `|${header.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

/** A faceted plot: each metric against an axis's value, mean with CI error bars, a line per series. */
function sensitivitySpec(axis: string, seeds: number, rows: { series: string; metric: string; x: number; mean: number; low: number | null; high: number | null }[]): TopLevelSpec {
  const xs = [...new Set(rows.map((r) => r.x))].sort((a, b) => a - b);
  const log = xs.length > 2 && xs[0]! > 0 && xs.at(-1)! / xs[0]! >= 20;
  const x = { field: 'x', type: 'quantitative' as const, title: axis, scale: { type: log ? ('log' as const) : ('linear' as const), zero: false }, axis: { values: xs } };
  const color = { field: 'series', type: 'nominal' as const, title: 'cells' };
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: `Sensitivity to ${axis}: mean and 95% CI over ${seeds} seed${seeds === 1 ? '' : 's'}`, fontSize: 15 },
    data: { values: rows },
    facet: { field: 'metric', type: 'nominal', title: null, sort: [...new Set(rows.map((r) => r.metric))] },
    columns: 3,
    spec: {
      width: 240,
      height: 180,
      layer: [
        { mark: { type: 'line', point: true, strokeWidth: 2 }, encoding: { x, y: { field: 'mean', type: 'quantitative', title: null, scale: { zero: false }, axis: { format: '~g' } }, color } },
        { transform: [{ filter: 'datum.low != null' }], mark: { type: 'errorbar', ticks: true }, encoding: { x, y: { field: 'low', type: 'quantitative' }, y2: { field: 'high' }, color } },
      ],
    },
    resolve: { scale: { y: 'independent' } },
    config: { font: 'DejaVu Sans', axis: { labelFontSize: 11, titleFontSize: 12 }, header: { labelFontSize: 12 }, legend: { labelFontSize: 12, titleFontSize: 13, labelLimit: 320 } },
  } as TopLevelSpec;
}

/** The study's report files in its out folder (study.json, study.md, the sensitivity plots), checked before a study starts. */
export const STUDY_REPORT_FILES = {
  json: 'study.json',
  generator: 'redflag study',
  legacyKeys: ['createdAt', 'config', 'cells', 'seeds', 'files'],
  others: (names: readonly string[]) => names.filter((n) => n === 'study.md' || /^sensitivity-.*\.(svg|png)$/.test(n)),
  hint: 'choose another out (--out), or pass --overwrite ("overwrite": true in the study config) to replace it',
} as const satisfies ReportFiles;

/** Aggregates the cells' results over seeds and writes study.json, study.md and the plots into `config.out`. */
export async function writeStudyReport(config: StudyConfig, plan: StudyPlan, model: string, results: readonly CellResult[]): Promise<StudyReport> {
  const titles = new Map<string, string>();
  for (const r of results) for (const [k, t] of Object.entries(r.titles)) if (!titles.has(k)) titles.set(k, t);
  // Table order: the trainer's figures, the eval report's columns, per-k rates, then time.
  const metrics = [...titles].map(([key, title]) => ({ key, title }));
  const cells = plan.cells.map((cell) => {
    const runs = plan.seeds.map((seed) => results.find((r) => r.cell === cell.name && r.seed === seed));
    const summary: Record<string, CellSummary> = {};
    for (const { key } of metrics) summary[key] = summarize(runs.map((r) => r?.metrics[key] ?? null));
    const seconds = { train: runs.reduce((a, r) => a + (r?.train.seconds ?? 0), 0), eval: runs.reduce((a, r) => a + (r?.eval.seconds ?? 0), 0) };
    return { name: cell.name, kind: cell.kind, overrides: cell.overrides, axes: cell.axes, summary, seconds };
  });
  const measured = (key: string) => cells.some((c) => c.summary[key]!.n > 0);
  const shown = (config.metrics ?? metrics.map((m) => m.key)).filter((k) => titles.has(k) && measured(k));
  const title = (key: string) => titles.get(key) ?? key;

  // Sensitivity plots: one per numeric grid axis.
  const plots: string[] = [];
  for (const [axis, values] of plan.axes) {
    if (!values.every((v) => typeof v === 'number')) continue;
    const others = plan.axes.filter(([a]) => a !== axis).map(([a]) => a);
    const rows = cells
      .filter((c) => c.kind === 'grid')
      .flatMap((c) =>
        shown.flatMap((key) => {
          const s = c.summary[key]!;
          if (s.n === 0) return [];
          const series = others.map((a) => `${a.split('.').at(-1)}=${JSON.stringify(c.axes[a])}`).join(', ') || 'mean ± 95% CI';
          return [{ series, metric: title(key), x: c.axes[axis] as number, mean: s.mean, low: s.low, high: s.high }];
        }),
      );
    if (rows.length === 0) continue;
    const file = join(config.out, `sensitivity-${axis.replace(/[^\w.-]/g, '_')}`);
    plots.push(...(await writePlot(file, sensitivitySpec(axis, plan.seeds.length, rows), true)).map((p) => relative(config.out, p)));
  }

  const files = { json: join(config.out, 'study.json'), markdown: join(config.out, 'study.md') };
  const report: StudyReport = { generator: STUDY_REPORT_FILES.generator, createdAt: new Date().toISOString(), config, model, seeds: plan.seeds, axes: plan.axes, metrics, shown, cells, plots, files };
  await writeFileAtomic(files.json, [new TextEncoder().encode(`${JSON.stringify(report, (_k, x) => (typeof x === 'number' && !Number.isFinite(x) ? null : x), 2)}\n`)], { overwrite: true });
  await writeFileAtomic(files.markdown, [new TextEncoder().encode(markdown(report, plan, title))], { overwrite: true });
  return report;
}

function markdown(report: Omit<StudyReport, 'files'>, plan: StudyPlan, title: (key: string) => string): string {
  const lines: string[] = ['# redflag study', ''];
  const suites = (plan.eval.suites as string[] | undefined) ?? ['(eval defaults)'];
  lines.push(`${report.createdAt} · base model \`${report.model}\` · ${report.cells.length} cells × ${report.seeds.length} seeds (${report.seeds.join(', ')}) · suites: ${suites.join(', ')}`, '');
  lines.push(mdTable(['cell', 'seeds', ...report.shown.map(title)], report.cells.map((c) => [c.name, String(Math.max(0, ...report.shown.map((k) => c.summary[k]!.n))), ...report.shown.map((k) => formatSummary(c.summary[k]))])));
  lines.push(
    '',
    report.seeds.length > 1
      ? `Each entry: mean over seeds ± half-width of its 95% confidence interval (Student t, n - 1 degrees of freedom: t · sd / √n). study.json holds every seed's value.`
      : 'One seed: each entry is that run\'s value (no interval).',
    '',
  );
  for (const plot of report.plots.filter((p) => p.endsWith('.png'))) lines.push(`![${plot}](${plot})`);
  if (report.plots.length) lines.push('');
  lines.push('## Cells', '');
  for (const c of report.cells) {
    const o = Object.keys(c.overrides).length ? `\`${JSON.stringify(c.overrides)}\`` : 'the base training config';
    lines.push(`- **${c.name}**: ${o}; training ${c.seconds.train.toFixed(0)}s, evaluation ${c.seconds.eval.toFixed(0)}s over its seeds`);
  }
  lines.push('');
  return lines.join('\n');
}
