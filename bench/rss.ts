/** Peak resident memory of work done in this process, for the memory benches. */

/**
 * Runs `work` while sampling the process's RSS every 20 ms (and whenever `work` calls `sample`):
 * the RSS just before it (after a GC where `--expose-gc` allows), the peak during it, and the
 * seconds it took.
 */
export async function measurePeakRss<T>(work: (sample: () => void) => Promise<T>): Promise<{ result: T; beforeBytes: number; peakBytes: number; seconds: number }> {
  globalThis.gc?.();
  const beforeBytes = process.memoryUsage().rss;
  let peakBytes = beforeBytes;
  const sample = () => void (peakBytes = Math.max(peakBytes, process.memoryUsage().rss));
  const timer = setInterval(sample, 20);
  const t0 = performance.now();
  try {
    const result = await work(sample);
    sample();
    return { result, beforeBytes, peakBytes, seconds: (performance.now() - t0) / 1000 };
  } finally {
    clearInterval(timer);
  }
}
