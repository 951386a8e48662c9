/**
 * One flag per risk category: which categories get a flag `<rf:NAME>` (the training config's
 * `flagCategories` and `categoryMap`), and which flag token each harmful example trains.
 * @module
 */
import { readFile } from 'node:fs/promises';

import type { EncodedConversation } from '../data/encode.js';
import { RedflagError } from '../errors.js';
import { parseJsonText } from '../model/config.js';
import { CATEGORY_NAME, flagCategoryName, type CategoryFlag } from '../model/red-flag-token.js';
import type { TrainConfig } from './config.js';

/** The category map: an object in the config, or a JSON file of one. */
async function loadCategoryMap(map: TrainConfig['categoryMap']): Promise<Record<string, string>> {
  if (map === undefined) return {};
  if (typeof map !== 'string') return map;
  let text: string;
  try {
    text = await readFile(map, 'utf8');
  } catch (cause) {
    throw new RedflagError('NOT_FOUND', 'cannot read the category map', { file: map, cause });
  }
  const json = parseJsonText(text, map);
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new RedflagError('INVALID_FILE', 'the category map must be a JSON object of data categories to flag category names', { file: map });
  }
  for (const [key, value] of Object.entries(json)) {
    if (typeof value !== 'string' || !CATEGORY_NAME.test(value)) {
      throw new RedflagError('INVALID_FILE', `"${key}" maps to ${JSON.stringify(value)}, not a category name (1-64 letters, digits, "_", "-" or ".")`, { file: map });
    }
  }
  return json as Record<string, string>;
}

/** How the data's categories become flags. */
export interface CategoryPlan {
  /** The flagged categories, in flag order. */
  categories: string[];
  /** An example's flag category, or null (the generic `<rf>`). */
  of(category: string | undefined): string | null;
}

/**
 * The flagged categories of a run: `auto` takes every category of the harmful training
 * examples (after the map), sorted; a list is taken as given. Null without `flagCategories`.
 */
export async function planCategories(config: TrainConfig, train: readonly EncodedConversation[]): Promise<CategoryPlan | null> {
  if (config.flagCategories === undefined) return null;
  const map = await loadCategoryMap(config.categoryMap);
  const name = (raw: string | undefined): string | null => (raw === undefined ? null : (map[raw] ?? flagCategoryName(raw)));
  let categories: string[];
  if (config.flagCategories === 'auto') {
    const found = new Set<string>();
    for (const ex of train) {
      const n = ex.label === 'harmful' ? name(ex.category) : null;
      if (n !== null) found.add(n);
    }
    categories = [...found].sort();
    if (categories.length === 0) {
      throw new RedflagError('INVALID_ARGUMENT', 'flagCategories "auto": no harmful training example has a category (a `category` field or column, or HarmBench\'s SemanticCategory)');
    }
  } else {
    categories = [...new Set(config.flagCategories)];
  }
  const flagged = new Set(categories);
  return {
    categories,
    of: (category) => {
      const n = name(category);
      return n !== null && flagged.has(n) ? n : null;
    },
  };
}

/** The flag token an example trains: its category's flag, or `<rf>`. */
export function flagTokenOf(plan: CategoryPlan | null, flags: readonly CategoryFlag[], rfToken: number): (ex: EncodedConversation) => number {
  if (plan === null || flags.length === 0) return () => rfToken;
  const ids = new Map(flags.map((f) => [f.category, f.id]));
  return (ex) => {
    const c = plan.of(ex.category);
    return c === null ? rfToken : (ids.get(c) ?? rfToken);
  };
}
