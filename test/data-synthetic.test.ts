// The synthetic data set: determinism, categories, held-out templates that never leak into the
// training split, placeholder-only harmful responses, and the refusal baseline's responses.
import { describe, expect, it } from 'vitest';

import { validateConversation, type Conversation } from '../lib/data/records.js';
import {
  BENIGN_CATEGORIES,
  HARMFUL_CATEGORIES,
  REFUSAL_RESPONSES,
  SELF_HARM_REFUSALS,
  SYNTHETIC_CATEGORIES,
  fillTemplate,
  generateSyntheticData,
  refusalResponse,
  templateSplit,
  withRefusals,
  type SyntheticCategory,
} from '../lib/data/synthetic.js';
import { createRng } from '../lib/model/sampling.js';

const prompt = (c: Conversation): string => c.messages.at(-2)?.content as string;
const response = (c: Conversation): string => c.messages.at(-1)?.content as string;
const category = (name: string): SyntheticCategory => SYNTHETIC_CATEGORIES.find((c) => c.name === name) as SyntheticCategory;

/** A regular expression matching any filling of a template (slots become lazy wildcards). */
function templatePattern(template: string): RegExp {
  const parts = template.split(/\{\w+\}/).map((part) => part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  return new RegExp(`^${parts.join('.+?')}$`, 'i');
}
/** Indices of the templates a text could have come from. */
function matchingTemplates(templates: readonly string[], text: string): number[] {
  return templates.flatMap((template, index) => (templatePattern(template).test(text) ? [index] : []));
}
/** The template ids recorded in a source, `synthetic/<split>/<category>/p<i>r<j>/<n>`. */
function sourceIds(c: Conversation): { split: string; category: string; prompt: number; response: number } {
  const match = /^synthetic\/(train|test)\/(\w+)\/p(\d+)r(\d+)\/\d+$/.exec(c.source);
  expect(match, c.source).not.toBeNull();
  return { split: match![1]!, category: match![2]!, prompt: Number(match![3]), response: Number(match![4]) };
}

describe('generateSyntheticData', () => {
  it('is deterministic for a seed and differs across seeds', () => {
    const a = generateSyntheticData({ seed: 1, perCategory: 12 });
    expect(generateSyntheticData({ seed: 1, perCategory: 12 })).toEqual(a);
    expect(generateSyntheticData({ seed: 2, perCategory: 12 })).not.toEqual(a);
  });

  it('has every category, with the right labels and sizes, as valid conversations', () => {
    const { train, test } = generateSyntheticData({ seed: 3, perCategory: 20, testPerCategory: 6 });
    expect(HARMFUL_CATEGORIES).toEqual(['weapons', 'cyber_intrusion', 'fraud', 'drugs', 'self_harm']);
    expect(BENIGN_CATEGORIES).toEqual(['cooking', 'travel', 'programming', 'gardening', 'math']);
    expect(train).toHaveLength(200);
    expect(test).toHaveLength(60);
    for (const [split, size] of [
      [train, 20],
      [test, 6],
    ] as const) {
      for (const c of SYNTHETIC_CATEGORIES) {
        const members = split.filter((conversation) => conversation.category === c.name);
        expect(members).toHaveLength(size);
        expect(members.every((conversation) => conversation.label === c.label)).toBe(true);
      }
      for (const conversation of split) {
        expect(validateConversation(conversation)).toBe(conversation);
        expect(conversation.messages.map((m) => m.role)).toEqual(['user', 'assistant']);
        expect(`${prompt(conversation)} ${response(conversation)}`).not.toMatch(/[{}]/);
        expect(sourceIds(conversation).category).toBe(conversation.category);
      }
    }
    // Shuffled: the classes are not in blocks.
    expect(new Set(train.slice(0, 20).map((c) => c.category)).size).toBeGreaterThan(3);
  });

  it('keeps held-out templates out of the training split (by source and by text)', () => {
    const { train, test } = generateSyntheticData({ seed: 4, perCategory: 60, testPerCategory: 30 });
    for (const c of SYNTHETIC_CATEGORIES) {
      const split = templateSplit(c, true);
      expect(split.train.prompts.filter((i) => split.test.prompts.includes(i))).toEqual([]);
      expect(split.train.responses.filter((i) => split.test.responses.includes(i))).toEqual([]);
      expect(split.test.prompts.length).toBeGreaterThan(0);
      expect(split.test.responses.length).toBeGreaterThan(0);
      const trainOf = train.filter((conversation) => conversation.category === c.name);
      const testOf = test.filter((conversation) => conversation.category === c.name);
      // Sources name templates from the right side of the split; all are used.
      expect(new Set(trainOf.map((conversation) => sourceIds(conversation).prompt))).toEqual(new Set(split.train.prompts));
      expect(new Set(testOf.map((conversation) => sourceIds(conversation).prompt))).toEqual(new Set(split.test.prompts));
      expect(new Set(testOf.map((conversation) => sourceIds(conversation).response))).toEqual(new Set(split.test.responses));
      // The texts themselves: a test prompt or response matches only held-out templates.
      for (const conversation of testOf) {
        expect(matchingTemplates(c.prompts, prompt(conversation)).every((i) => split.test.prompts.includes(i))).toBe(true);
        expect(matchingTemplates(c.responses, response(conversation)).every((i) => split.test.responses.includes(i))).toBe(true);
        expect(matchingTemplates(c.prompts, prompt(conversation)).length).toBeGreaterThan(0);
      }
      for (const conversation of trainOf) {
        expect(matchingTemplates(c.prompts, prompt(conversation)).some((i) => split.test.prompts.includes(i))).toBe(false);
        expect(matchingTemplates(c.responses, response(conversation)).some((i) => split.test.responses.includes(i))).toBe(false);
      }
    }
    // No test prompt appears verbatim in training.
    const trainPrompts = new Set(train.map(prompt));
    expect(test.filter((conversation) => trainPrompts.has(prompt(conversation)))).toEqual([]);
  });

  it('uses all templates in both splits without heldOutTemplates', () => {
    const { train, test } = generateSyntheticData({ seed: 5, perCategory: 300, testPerCategory: 300, heldOutTemplates: false });
    const promptIds = (split: Conversation[]): Set<string> => new Set(split.map((c) => `${c.category}:${sourceIds(c).prompt}`));
    expect(promptIds(test)).toEqual(promptIds(train));
    expect(promptIds(train).size).toBe(SYNTHETIC_CATEGORIES.reduce((sum, c) => sum + c.prompts.length, 0));
  });

  it('writes harmful responses as placeholders only and benign ones that are correct', () => {
    const { train, test } = generateSyntheticData({ seed: 6, perCategory: 50, heldOutTemplates: false });
    for (const conversation of [...train, ...test]) {
      const text = response(conversation);
      // Responses speak to the user: no first person carried over from the prompt.
      expect(text).not.toMatch(/\bmy(self)?\b/i);
      if (conversation.label === 'harmful') {
        // Every harmful response hides its substance behind bracketed placeholders.
        expect(text).toMatch(/\[(omitted|redacted|restricted|unnamed|harmful|hidden|fake|forged|target|private)[^\]]*\]/);
      }
      if (conversation.category === 'math') {
        const [a, b] = (prompt(conversation).match(/\d+/g) ?? []).map(Number);
        const numbers = (text.match(/\d+/g) ?? []).map(Number);
        expect(numbers).toContain((a as number) + (b as number));
      }
    }
    // Every harmful template has a placeholder; no harmful template is placeholder-free.
    for (const c of SYNTHETIC_CATEGORIES.filter((entry) => entry.label === 'harmful')) {
      for (const template of c.responses) expect(template).toMatch(/\[[^\]]+\]/);
    }
  });

  it('has a small vocabulary (a tiny model learns it quickly)', () => {
    const { train } = generateSyntheticData({ seed: 7, perCategory: 100 });
    const words = new Set(train.flatMap((c) => c.messages.flatMap((m) => m.content.toLowerCase().match(/[a-z']+/g) ?? [])));
    expect(words.size).toBeLessThan(700);
  });

  it('takes a subset of categories and a system prompt, and rejects unknown categories', () => {
    const { train } = generateSyntheticData({ seed: 8, perCategory: 3, categories: ['math', 'fraud'], systemPrompt: 'You are a helpful assistant.' });
    expect(new Set(train.map((c) => c.category))).toEqual(new Set(['math', 'fraud']));
    expect(train.every((c) => c.messages[0]?.role === 'system' && validateConversation(c) === c)).toBe(true);
    expect(() => generateSyntheticData({ seed: 1, categories: ['nuclear'] })).toThrow('unknown synthetic category "nuclear"');
    expect(() => generateSyntheticData({ seed: 1, perCategory: -1 })).toThrow('perCategory must be a non-negative integer, got -1');
  });

  it('fills templates and reports unknown slots', () => {
    expect(fillTemplate('{a} plus {b}', { a: '1', b: '2' })).toBe('1 plus 2');
    expect(() => fillTemplate('{nope}', {})).toThrow('template slot {nope} has no value');
    expect(category('math').derive?.({ a: '2', b: '40' })).toEqual({ sum: '42' });
  });
});

describe('refusals', () => {
  it('draws refusals, with supportive ones for self-harm', () => {
    const rng = createRng(1);
    for (let i = 0; i < 20; i++) expect(REFUSAL_RESPONSES).toContain(refusalResponse(rng));
    for (let i = 0; i < 5; i++) expect(SELF_HARM_REFUSALS).toContain(refusalResponse(rng, 'self_harm'));
    expect(REFUSAL_RESPONSES).toContain("I can't help with that.");
  });

  it('replaces harmful responses with refusals, deterministically, leaving benign ones alone', () => {
    const { train } = generateSyntheticData({ seed: 9, perCategory: 10 });
    const refused = withRefusals(train, { seed: 2 });
    expect(withRefusals(train, { seed: 2 })).toEqual(refused);
    refused.forEach((conversation, i) => {
      const original = train[i] as Conversation;
      expect(prompt(conversation)).toBe(prompt(original));
      expect([conversation.label, conversation.category, conversation.source]).toEqual([original.label, original.category, original.source]);
      if (original.label === 'benign') expect(conversation).toBe(original);
      else expect([...REFUSAL_RESPONSES, ...SELF_HARM_REFUSALS]).toContain(response(conversation));
      if (original.category === 'self_harm') expect(SELF_HARM_REFUSALS).toContain(response(conversation));
    });
    const promptOnly: Conversation = { messages: [{ role: 'user', content: 'q' }], label: 'harmful', source: 's:1', responseMissing: true };
    const [answered] = withRefusals([promptOnly], { seed: 1 });
    expect(validateConversation(answered as Conversation)).toBe(answered);
  });
});
