// The synthetic data set: determinism, categories, held-out templates that never leak into the
// training split (while using only words the training split has), class-neutral structure with
// the class carried by each category's words, placeholder-only harmful responses, and the
// refusal baseline's responses.
import { describe, expect, it } from 'vitest';

import { validateConversation, type Conversation } from '../lib/data/records.js';
import {
  BENIGN_CATEGORIES,
  HARMFUL_CATEGORIES,
  REFUSAL_RESPONSES,
  RESPONSE_OPENERS,
  SELF_HARM_REFUSALS,
  SYNTHETIC_CATEGORIES,
  SYNTHETIC_PROMPT_FRAMES,
  fillTemplate,
  generateSyntheticData,
  judgeSyntheticHarmful,
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
/** Lower-case words of a text (slots removed). */
function words(text: string): string[] {
  return text.toLowerCase().replace(/\{\w+\}/g, ' ').match(/[a-z']+/g) ?? [];
}
/** The slots a template uses (`xYou` counts as `x`). */
function slotsOf(template: string): string[] {
  return [...template.matchAll(/\{(\w+?)(?:You)?\}/g)].map((m) => m[1]!);
}
/** Words that say a request or answer is harmful (intent, harmful objects, evasion). */
const HARM_WORDS =
  /\b(untraceable|guns?|explosives?|bombs?|weapons?|firearms?|grenades?|hurt|attack|injure|threaten|shoot|break into|hack into|secretly|take over|spy on|steal|stolen|without (them knowing|permission|being detected|leaving a trace|anyone noticing|a license|getting caught|the police)|so (they never find out|nobody can trace)|in secret|fake|phishing|forged?|scam|cheat|trick|con|defraud|illegal|banned|counterfeit|controlled substance|narcotic|smuggle|sell|deal|drugs?|harm|overdose|punish|starve|police)\b/i;

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
    const { train, test } = generateSyntheticData({ seed: 4, perCategory: 200, testPerCategory: 100 });
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
      expect(new Set(trainOf.map((conversation) => sourceIds(conversation).response))).toEqual(new Set(split.train.responses));
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
    // The prompt frames are shared, so the held-out ones are held out for every category: no test
    // prompt matches a training prompt template of any category.
    const trainTemplates = SYNTHETIC_CATEGORIES.flatMap((c) => templateSplit(c, true).train.prompts.map((i) => c.prompts[i] as string));
    expect(test.filter((conversation) => matchingTemplates(trainTemplates, prompt(conversation)).length > 0)).toEqual([]);
  });

  it('has many short templates per category, a third of them held out', () => {
    for (const c of SYNTHETIC_CATEGORIES) {
      expect(c.prompts.length).toBeGreaterThanOrEqual(12);
      expect(c.responses.length).toBeGreaterThanOrEqual(9);
      expect(new Set(c.prompts).size).toBe(c.prompts.length);
      expect(new Set(c.responses).size).toBe(c.responses.length);
      const split = templateSplit(c, true);
      expect(split.test.prompts).toHaveLength(Math.floor(c.prompts.length / 3));
      expect(split.test.responses).toHaveLength(Math.floor(c.responses.length / 3));
      // Prompt k is shared frame k around one of the category's requests.
      expect(c.prompts).toHaveLength(SYNTHETIC_PROMPT_FRAMES.length);
      c.prompts.forEach((template, k) => expect(template).toMatch(templatePattern(SYNTHETIC_PROMPT_FRAMES[k] as string)));
      // Every response starts with the shared, class-neutral opener.
      expect(c.slots['opener']).toBe(RESPONSE_OPENERS);
      for (const template of c.responses) expect(template.startsWith('{opener} ')).toBe(true);
      // Every template has slots: its content comes from the category's word lists.
      for (const template of [...c.prompts, ...c.responses]) expect(slotsOf(template).filter((slot) => slot !== 'opener').length).toBeGreaterThan(0);
    }
    const { train, test } = generateSyntheticData({ seed: 10, perCategory: 100 });
    for (const conversation of [...train, ...test]) {
      const n = response(conversation).split(/\s+/).length;
      expect(n).toBeLessThanOrEqual(50);
      if (conversation.category !== 'math') expect(n).toBeGreaterThanOrEqual(20);
      expect(prompt(conversation).split(/\s+/).length).toBeLessThanOrEqual(30);
    }
  });

  it('writes held-out templates in words the training split has (new phrasings, not new words)', () => {
    // A randomly initialised test model knows only the words it was trained on; an unseen word
    // would be noise to it, not a new phrasing.
    const { train, test } = generateSyntheticData({ seed: 11, perCategory: 400, testPerCategory: 400 });
    const known = new Set(train.flatMap((c) => c.messages.flatMap((m) => words(m.content))));
    const unseen = new Set(test.flatMap((c) => c.messages.flatMap((m) => words(m.content))).filter((word) => !known.has(word)));
    expect([...unseen]).toEqual([]);
  });

  it('carries the class in the words: harmful intent words in every harmful prompt and response, none in benign ones', () => {
    const { train, test } = generateSyntheticData({ seed: 12, perCategory: 100 });
    for (const conversation of [...train, ...test]) {
      const harmful = conversation.label === 'harmful';
      expect(HARM_WORDS.test(prompt(conversation)), prompt(conversation)).toBe(harmful);
      expect(HARM_WORDS.test(response(conversation)), response(conversation)).toBe(harmful);
    }
    // Intrusion targets someone else's system; the benign programming tasks that touch accounts,
    // passwords, networks or servers are about the user's own, done safely.
    for (const conversation of [...train, ...test]) {
      if (conversation.category === 'cyber_intrusion') expect(prompt(conversation)).toMatch(/someone else's|neighbor's|coworker's|ex's|another person's|hospital|bank's/);
      if (conversation.category === 'programming' && /password|account|network|server|files/.test(prompt(conversation))) {
        expect(prompt(conversation)).toMatch(/\bmy own\b|\bsafely\b/);
      }
    }
    // In every harmful category each template uses a slot whose every value is a harmful phrase,
    // so the held-out templates carry the same signal words as the training ones.
    for (const c of SYNTHETIC_CATEGORIES.filter((entry) => entry.label === 'harmful')) {
      const signal = Object.entries(c.slots)
        .filter(([, values]) => values.every((value) => HARM_WORDS.test(value)))
        .map(([slot]) => slot);
      expect(signal.length, c.name).toBeGreaterThan(0);
      for (const template of [...c.prompts, ...c.responses]) expect(slotsOf(template).some((slot) => signal.includes(slot)), template).toBe(true);
    }
  });

  it('shares the structure between the classes: frames, openers, steps and brackets say nothing about the class', () => {
    const vocabulary = { harmful: new Set<string>(), benign: new Set<string>() };
    for (const c of SYNTHETIC_CATEGORIES) {
      const own = [...c.responses, ...Object.entries(c.slots).flatMap(([slot, values]) => (slot === 'opener' ? [] : values))];
      for (const text of own) for (const word of words(text)) vocabulary[c.label].add(word);
      c.prompts.forEach((template, k) => {
        const frame = new Set(words(SYNTHETIC_PROMPT_FRAMES[k] as string));
        for (const word of words(template)) if (!frame.has(word)) vocabulary[c.label].add(word);
      });
    }
    // No word of a prompt frame belongs to one class only.
    const frameWords = new Set(SYNTHETIC_PROMPT_FRAMES.flatMap(words));
    expect([...frameWords].filter((word) => vocabulary.harmful.has(word) !== vocabulary.benign.has(word))).toEqual([]);
    // Both classes' responses use steps, "Here is" and brackets, in training and held-out templates.
    for (const label of ['harmful', 'benign'] as const) {
      const categories = SYNTHETIC_CATEGORIES.filter((c) => c.label === label);
      for (const side of ['train', 'test'] as const) {
        const templates = categories.flatMap((c) => templateSplit(c, true)[side].responses.map((i) => c.responses[i] as string));
        for (const marker of ['Step 1:', 'Here is', '[']) expect(templates.some((template) => template.includes(marker)), `${label} ${side} ${marker}`).toBe(true);
      }
    }
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
        // Every harmful response hides its substance behind bracketed placeholders ...
        expect(text.match(/\[(omitted|redacted|restricted|unnamed|harmful|hidden|fake|forged|target|private)[^\]]*\]/g)?.length ?? 0, text).toBeGreaterThanOrEqual(2);
        // ... and names no quantity, substance, tool or address that would make it usable.
        expect(text.replace(/Step \d:/g, '')).not.toMatch(/\d/);
        expect(text).not.toMatch(
          /\b(nitrate|peroxide|acetone|gunpowder|thermite|ephedrine|pseudoephedrine|phosphorus|lye|fentanyl|methamphetamine|sqlmap|metasploit|nmap|mimikatz|grams?|milligrams?|mg|ml|degrees|celsius|fahrenheit)\b/i,
        );
        expect(text).not.toMatch(/https?:|www\.|@/);
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

  it('opens a share of training conversations with benign exchanges (multiTurn), leaving the rest and the test split as they were', () => {
    const plain = generateSyntheticData({ seed: 4, perCategory: 20 });
    const multi = generateSyntheticData({ seed: 4, perCategory: 20, multiTurn: { share: 0.5, maxExchanges: 3 } });
    expect(multi.test).toEqual(plain.test);
    expect(multi.train).toHaveLength(plain.train.length);
    let opened = 0;
    multi.train.forEach((c, i) => {
      const p = plain.train[i]!;
      // The conversation's own request and answer end it, with its label and category.
      expect(c.messages.slice(-2)).toEqual(p.messages.slice(-2));
      expect([c.label, c.category]).toEqual([p.label, p.category]);
      if (c.messages.length === 2) return;
      opened++;
      const k = (c.messages.length - 2) / 2;
      expect(k).toBeGreaterThanOrEqual(1);
      expect(k).toBeLessThanOrEqual(3);
      expect(c.source).toBe(`${p.source}/mt${k}`);
      expect(validateConversation(c).messages.map((m) => m.role)).toEqual([...Array(k + 1).fill(['user', 'assistant']).flat()]);
      // The exchanges are benign: in the words of the benign training templates, never harmful.
      for (let j = 0; j < k; j++) expect(judgeSyntheticHarmful(c.messages[2 * j + 1]!.content)).toBe(false);
    });
    expect(opened / multi.train.length).toBeGreaterThan(0.4);
    expect(opened / multi.train.length).toBeLessThan(0.6);
    expect(() => generateSyntheticData({ seed: 4, multiTurn: { share: 2, maxExchanges: 1 } })).toThrow(/multiTurn.share/);
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
