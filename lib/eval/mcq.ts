/**
 * Multiple-choice questions (MMLU-style `{question, choices, answer}`) for the utility suite:
 * reading them from JSONL, and a generator of such questions about the synthetic corpus's benign
 * categories (its arithmetic and its word lists), so a model trained on the corpus can be asked
 * what it learned. Accuracy is by log-likelihood: the choice whose tokens the model finds most
 * likely after the question (summed log-probability, the `acc` of lm-evaluation-harness) wins.
 * @module
 */
import { readFile } from 'node:fs/promises';

import { SYNTHETIC_CATEGORIES } from '../data/synthetic.js';
import { RedflagError } from '../errors.js';
import { createRng } from '../model/sampling.js';

/** One question; `answer` is the index of the right choice. */
export interface McQuestion {
  question: string;
  choices: string[];
  answer: number;
}

/**
 * Reads a JSONL file of `{question, choices, answer}`; `answer` is the index (0-based), a letter
 * (`"B"`) or the right choice's text. Errors name `file:line` and the field.
 */
export async function loadMcQuestions(file: string): Promise<McQuestion[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (cause) {
    throw new RedflagError('NOT_FOUND', 'cannot read the multiple-choice file', { file, cause });
  }
  const out: McQuestion[] = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (line.trim().length === 0) return;
    const where = `${file}:${i + 1}`;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (cause) {
      throw new RedflagError('INVALID_FILE', 'not valid JSON', { file: where, cause });
    }
    out.push(checkQuestion(row, where));
  });
  if (out.length === 0) throw new RedflagError('INVALID_FILE', 'has no questions', { file });
  return out;
}

function checkQuestion(row: unknown, where: string): McQuestion {
  const r = row as Record<string, unknown>;
  const bad = (m: string) => new RedflagError('INVALID_FILE', m, { file: where });
  if (typeof r !== 'object' || r === null || Array.isArray(r)) throw bad('row must be an object {question, choices, answer}');
  if (typeof r['question'] !== 'string' || r['question'].trim() === '') throw bad('field "question" must be a non-empty string');
  const choices = r['choices'];
  if (!Array.isArray(choices) || choices.length < 2 || !choices.every((c) => typeof c === 'string' && c.trim() !== '')) {
    throw bad('field "choices" must be an array of at least 2 non-empty strings');
  }
  const a = r['answer'];
  let answer = -1;
  if (typeof a === 'number' && Number.isInteger(a)) answer = a;
  else if (typeof a === 'string' && /^[A-Za-z]$/.test(a)) answer = a.toUpperCase().charCodeAt(0) - 65;
  else if (typeof a === 'string') answer = (choices as string[]).indexOf(a);
  if (!(answer >= 0 && answer < choices.length)) throw bad(`field "answer" must name one of the ${choices.length} choices (an index, a letter or the text), got ${JSON.stringify(a)}`);
  return { question: r['question'], choices: choices as string[], answer };
}

function slot(category: string, name: string): readonly string[] {
  const c = SYNTHETIC_CATEGORIES.find((x) => x.name === category);
  const values = c?.slots[name];
  if (!values) throw new RedflagError('INVALID_ARGUMENT', `synthetic category ${category} has no slot ${name}`);
  return values;
}

function shuffled<T>(items: T[], rng: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

/**
 * Questions about the synthetic corpus's benign categories, deterministic for a seed: sums (the
 * math category's numbers; wrong choices off by 1, 10 and a swapped digit), and which word
 * belongs to a category (a plant, a dish, a programming language, among words of the others).
 * Four choices each.
 */
export function generateSyntheticMcq(options: { seed: number; count: number }): McQuestion[] {
  const rng = createRng(options.seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)]!;
  const kinds: { question: string; right: readonly string[]; wrong: readonly string[] }[] = [
    { question: 'Which of these can you grow in a garden?', right: slot('gardening', 'plant'), wrong: [...slot('programming', 'language'), ...slot('cooking', 'dish')] },
    { question: 'Which of these is a dish you can cook?', right: slot('cooking', 'dish'), wrong: [...slot('programming', 'language'), ...slot('gardening', 'plant')] },
    { question: 'Which of these is a programming language?', right: slot('programming', 'language'), wrong: [...slot('gardening', 'plant'), ...slot('cooking', 'dish')] },
  ];
  const out: McQuestion[] = [];
  for (let n = 0; n < options.count; n++) {
    if (n % 2 === 0) {
      const a = 2 + Math.floor(rng() * 48);
      const b = 2 + Math.floor(rng() * 48);
      const sum = a + b;
      const wrong = new Set<number>();
      for (const w of [sum + 1, sum - 1, sum + 10, sum - 10, Number(String(sum).split('').reverse().join(''))]) if (w !== sum && w > 0) wrong.add(w);
      const choices = shuffled([sum, ...shuffled([...wrong], rng).slice(0, 3)], rng).map(String);
      out.push({ question: `What is ${a} plus ${b}?`, choices, answer: choices.indexOf(String(sum)) });
    } else {
      const kind = pick(kinds);
      const right = pick(kind.right);
      const wrong = shuffled([...new Set(kind.wrong)], rng).slice(0, 3);
      const choices = shuffled([right, ...wrong], rng);
      out.push({ question: kind.question, choices, answer: choices.indexOf(right) });
    }
  }
  return out;
}

/** The index of the largest score (the first on ties). */
export function argmax(scores: readonly number[]): number {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i]! > scores[best]!) best = i;
  return best;
}
