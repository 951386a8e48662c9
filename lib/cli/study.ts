/**
 * `redflag study --config study.json [--out DIR] [--threads N] [--overwrite]`: progress lines on stderr,
 * Ctrl-C that stops after the current training step (checkpointed) or eval unit (cached) so the
 * same command resumes, and the study table on stdout.
 * @module
 */
import { readFile } from 'node:fs/promises';

import { RedflagError } from '../errors.js';
import { loadStudyConfig } from '../study/config.js';
import { runStudy } from '../study/runner.js';

/** Runs `redflag study`. */
export async function runStudyCommand(flags: { config?: string; out?: string; threads?: number; overwrite?: boolean }): Promise<void> {
  if (!flags.config) throw new RedflagError('INVALID_ARGUMENT', 'study needs --config FILE (see README, Study)');
  const config = await loadStudyConfig(flags.config, {
    ...(flags.out ? { out: flags.out } : {}),
    ...(flags.threads ? { threads: flags.threads } : {}),
    ...(flags.overwrite ? { overwrite: true } : {}),
  });
  const controller = new AbortController();
  const onSigint = () => {
    process.stderr.write('\nstopping: finished cells are kept, training checkpoints, evaluation is cached; run the same command again to resume\n');
    controller.abort(new RedflagError('ABORTED', 'interrupted: run the same command again to resume the study'));
  };
  process.once('SIGINT', onSigint);
  try {
    const report = await runStudy(config, { signal: controller.signal, log: (line) => process.stderr.write(`${line}\n`) });
    process.stdout.write(await readFile(report.files.markdown, 'utf8'));
  } finally {
    process.off('SIGINT', onSigint);
  }
}
