/**
 * The worker thread of {@link EncodeThread} (encode-thread.ts): a copy of the tokenizer that
 * encodes long prompts and conversations, so the event loop that serves other requests does not
 * wait for them. Answers each job with its ids, or with the error's code and message.
 * @module
 */
import { parentPort, workerData } from 'node:worker_threads';

import { RedflagError } from '../errors.js';
import { Tokenizer } from '../model/tokenizer.js';
import { encodeForScoring, encodePrompt, type ScoringInput } from './encode.js';
import type { EncodeJob, EncodeReply, TokenizerCopy } from './encode-thread.js';

const copy = workerData as TokenizerCopy;
const tokenizer = Tokenizer.fromObjects(copy.tokenizerJson, copy.tokenizerConfig, { chatTemplate: copy.chatTemplate });
tokenizer.chatTemplateKwargs = copy.chatTemplateKwargs;

function run(job: EncodeJob): number[] | ScoringInput[] {
  switch (job.kind) {
    case 'prompt':
      return encodePrompt(tokenizer, job.messages, job.extra === undefined ? {} : { chatTemplateExtra: job.extra });
    case 'text':
      return tokenizer.encode(tokenizer.escapeSpecialTokens(job.text, job.escape));
    case 'scoring':
      return job.items.map((item) => encodeForScoring(tokenizer, item.messages, item.responseMissing, item.source));
  }
}

parentPort!.on('message', (job: EncodeJob) => {
  let reply: EncodeReply;
  try {
    reply = { id: job.id, result: run(job) };
  } catch (error) {
    const code = error instanceof RedflagError ? error.code : 'NATIVE';
    reply = { id: job.id, error: { code, message: error instanceof Error ? error.message : String(error) } };
  }
  parentPort!.postMessage(reply);
});
