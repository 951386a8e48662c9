/**
 * The demo's last stage: `redflag eval` over the base model, the red-flag adapter and the refusal
 * baseline on the pipeline's held-out templates, every suite at a budget that keeps the whole
 * demo near ten minutes on two cores. Prints the comparison table; the figures, plot paths and
 * each suite's time go into the demo's JSON.
 * @module
 */
import { join } from 'node:path';

import type { EvalConfigInput } from './eval/config.js';
import { evaluate } from './eval/evaluate.js';
import { formatTable, type ReportTable } from './eval/report.js';
import type { PipelineResult } from './train/pipeline.js';

/** What the demo reports of its evaluation. */
export interface DemoEval {
  table: ReportTable;
  /** The report's files (report.md, report.json, plots), absolute. */
  files: string[];
  /** Seconds per variant and suite. */
  seconds: Record<string, Record<string, number>>;
}

/** The evaluation config the demo runs (exported for the test that checks its bounds). */
export function demoEvalConfig(result: PipelineResult, perCategory: number, out: string, threads?: number, device = 'cpu'): EvalConfigInput {
  return {
    model: join(result.dirs.lm, 'model'),
    variants: [
      { name: 'base', source: 'base' },
      { name: 'redflag', source: join(result.dirs.redflag, 'adapter') },
      { name: 'refusal', source: join(result.dirs.refusal, 'adapter') },
    ],
    // The pipeline's own held-out split (same seed and size), 25 harmful and 25 benign of it.
    synthetic: { seed: 0, perCategory, testPerCategory: Math.max(1, Math.floor(perCategory / 4)), mcqCount: 20 },
    limit: 25,
    suites: ['detection', 'sampling', 'prefill', 'long-context', 'suppression', 'utility', 'embedding', 'gcg', 'finetune'],
    samples: 16,
    temperature: 1,
    maxTokens: 40,
    prefillK: [2, 4, 8, 16],
    contextK: [0, 2, 4],
    bootstrapResamples: 500,
    attacks: {
      embedding: { epsilons: [0, 0.05, 0.1, 0.2], steps: 5, items: 10 },
      gcg: { steps: 8, items: 4, candidates: 16, topK: 32 },
      finetune: { steps: 100 },
    },
    ...(threads ? { threads } : {}),
    ...(device !== 'cpu' ? { device } : {}),
    out,
  };
}

/** Runs the demo's evaluation into `dir/eval`; `log` gets progress lines and the table. */
export async function runDemoEval(result: PipelineResult, perCategory: number, dir: string, log: (line: string) => void, threads?: number, device = 'cpu'): Promise<DemoEval> {
  const out = join(dir, 'eval');
  let last = 0;
  const report = await evaluate(demoEvalConfig(result, perCategory, out, threads, device), {
    onProgress: (e) => {
      const now = performance.now();
      if (e.phase === 'end') log(`  [eval] ${e.variant} ${e.suite}: ${e.seconds!.toFixed(1)} s`);
      else if (e.phase === 'progress' && now - last > 10_000) {
        last = now;
        log(`  [eval] ${e.variant} ${e.suite} ${e.done}/${e.total}`);
      }
    },
  });
  log('');
  log(formatTable(report.table));
  return {
    table: report.table,
    files: [report.files.markdown, report.files.json, ...report.plots.map((p) => join(out, p))],
    seconds: report.seconds,
  };
}
