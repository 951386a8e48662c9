/**
 * Studies (`redflag study`): a grid of training variants × seeds, each evaluated, aggregated into
 * one report with 95% confidence intervals and sensitivity plots.
 * @module
 */
export { parseStudyConfig, loadStudyConfig, planStudy, studyConfigSchema, type StudyConfig, type StudyConfigInput, type StudyCell, type StudyPlan } from './config.js';
export { runStudy, cellMetrics, type StudyHooks, type CellResult } from './runner.js';
export { meanInterval, tQuantile975, type MeanInterval } from '../eval/stats.js';
export { writeStudyReport, summarize, formatSummary, type StudyReport, type CellSummary } from './report.js';
