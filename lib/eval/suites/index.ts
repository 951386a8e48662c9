/**
 * The registered suites, by name. A new suite implements {@link Suite} in its own file and is
 * added here and to `SUITE_NAMES` (types.ts).
 * @module
 */
import type { Suite, SuiteName } from '../types.js';
import { detectionSuite } from './detection.js';
import { embeddingSuite } from './embedding.js';
import { finetuneSuite } from './finetune.js';
import { gcgSuite } from './gcg.js';
import { longContextSuite } from './long-context.js';
import { prefillSuite } from './prefill.js';
import { samplingSuite } from './sampling.js';
import { suppressionSuite } from './suppression.js';
import { utilitySuite } from './utility.js';

export const SUITES: Readonly<Record<SuiteName, Suite<unknown>>> = {
  detection: detectionSuite,
  sampling: samplingSuite,
  prefill: prefillSuite,
  'long-context': longContextSuite,
  suppression: suppressionSuite,
  utility: utilitySuite,
  embedding: embeddingSuite,
  gcg: gcgSuite,
  finetune: finetuneSuite,
};
