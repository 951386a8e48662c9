// An adapter trained with chat-template kwargs, evaluated by a config without them: the variant
// renders its prompts with the adapter's kwargs, and utility's base reference must answer the
// same prompts (it answered others, so a near-copy of the base agreed on nothing).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { evaluate } from '../lib/eval/evaluate.js';
import { train } from '../lib/train/trainer.js';
import { tinyLlama } from './helpers/tiny-model.js';
import { smallTrainConfig } from './helpers/train-config.js';

const TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% if terse %} Briefly:{% endif %}{% endif %}";
let base: string;
let root: string;
beforeAll(async () => {
  base = await tinyLlama({ hiddenSize: 32, intermediateSize: 64 }, TEMPLATE);
  root = await mkdtemp(join(tmpdir(), 'redflag-eval-kwargs-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
  await rm(base, { recursive: true, force: true });
});

describe('evaluation of an adapter trained with template kwargs', () => {
  it("compares it with the base on the adapter's prompts", async () => {
    // A learning rate of ~0: the adapter is the base, so its greedy answers are the base's.
    await train(smallTrainConfig(base, root, 'rf', { steps: 1, checkpointEvery: 0, optimizer: { lr: 1e-12 }, chatTemplateKwargs: { terse: true } }));
    const out = join(root, 'eval');
    await evaluate({ model: base, out, variants: [{ name: 'rf', source: join(root, 'rf', 'adapter') }], suites: ['utility'], synthetic: { perCategory: 4, mcqCount: 0 }, limit: 4, maxTokens: 8, threads: 2, png: false });
    const utility = JSON.parse(await readFile(join(out, 'report.json'), 'utf8')).results.rf.utility;
    expect(utility.greedy.prompts).toBe(4);
    expect(utility.greedy.exactMatch).toBe(1);
    expect(utility.kl).toBeLessThan(1e-3);
  });
});
