/**
 * Stop strings on streamed text: tokens are released only once their text cannot be the
 * start of a stop string, and generation ends at the first stop string, which is not shown.
 * Shared by {@link Model.generate} and the detector.
 * @module
 */
import { RedflagError } from '../errors.js';

/** Length of the longest suffix of text that is a proper prefix of some stop string. */
function heldBackLength(text: string, stops: readonly string[]): number {
  let hold = 0;
  for (const s of stops) {
    for (let n = Math.min(s.length - 1, text.length); n > hold; n--) {
      if (text.endsWith(s.slice(0, n))) {
        hold = n;
        break;
      }
    }
  }
  return hold;
}

/** Holds back streamed items (anything with a `text`) until their text is decided. */
export class StopFilter<T extends { text: string }> {
  readonly #stops: readonly string[];
  readonly #pending: T[] = [];
  /** The last item pushed (what carries the decoder's tail at the end if nothing is pending). */
  #last: T | null = null;

  /** Throws INVALID_ARGUMENT (its message starting with `what`) unless `stops` is an array of non-empty strings. */
  constructor(stops: unknown, what = 'stop') {
    if (!Array.isArray(stops) || stops.some((s) => typeof s !== 'string' || s.length === 0)) {
      throw new RedflagError('INVALID_ARGUMENT', `${what} must be an array of non-empty strings`);
    }
    this.#stops = stops as string[];
  }

  /**
   * Adds an item; returns the items now safe to show and whether a stop string was reached
   * (then the items returned end just before it, the last one's text cut, and nothing more
   * may be pushed). With `holdLast` (the text decoder still holds text back that belongs to
   * this item) the item stays pending even when its text is decided, so that {@link flush} can
   * give it the held text rather than lose it.
   */
  push(item: T, holdLast = false): { ready: T[]; stopped: boolean } {
    this.#pending.push(item);
    this.#last = item;
    const result = this.#release(false);
    if (holdLast && !result.stopped && this.#pending.length === 0 && result.ready.length > 0) this.#pending.push(result.ready.pop()!);
    return result;
  }

  /**
   * Generation ended: releases what was held, with `rest` (the decoder's tail) appended to the
   * last item, up to a stop string the tail completes (`stopped` then, as in {@link push}).
   */
  flush(rest = ''): { ready: T[]; stopped: boolean } {
    if (rest) {
      const last = this.#pending.at(-1);
      // Nothing pending to carry it (the decoder held text back unannounced): the last item's
      // fields carry it, rather than losing the end of the answer.
      if (last === undefined) this.#pending.push({ ...(this.#last ?? ({} as T)), text: rest });
      else this.#pending[this.#pending.length - 1] = { ...last, text: last.text + rest };
    }
    return this.#release(true);
  }

  /** Releases the pending items up to the first stop string, or those whose text is decided (`all`: every one). */
  #release(all: boolean): { ready: T[]; stopped: boolean } {
    const text = this.#pending.map((p) => p.text).join('');
    const hit = this.#stops.reduce((best, s) => {
      const i = text.indexOf(s);
      return i >= 0 && i < best ? i : best;
    }, Infinity);
    const ready: T[] = [];
    if (hit !== Infinity) {
      let budget = hit;
      while (this.#pending.length > 0 && budget > 0) {
        const p = this.#pending.shift()!;
        ready.push({ ...p, text: p.text.slice(0, budget) });
        budget -= p.text.length;
      }
      this.#pending.length = 0;
      return { ready, stopped: true };
    }
    if (all) return { ready: this.#pending.splice(0), stopped: false };
    let budget = text.length - heldBackLength(text, this.#stops);
    while (this.#pending.length > 0 && this.#pending[0]!.text.length <= budget) {
      const p = this.#pending.shift()!;
      budget -= p.text.length;
      ready.push(p);
    }
    return { ready, stopped: false };
  }
}
