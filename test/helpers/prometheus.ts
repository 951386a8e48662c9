/**
 * A strict reader of the Prometheus text format (version 0.0.4) for tests: every line must be a
 * `# HELP` / `# TYPE` comment or a sample `name{label="value",...} number`, or it throws.
 */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parsePrometheus(text: string): Sample[] {
  const samples: Sample[] = [];
  text.split('\n').forEach((line, i) => {
    if (line === '' || /^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* /.test(line)) return;
    const m = SAMPLE.exec(line);
    // Values are Go floats: NaN and ±Inf in any case (prom-client writes "Nan").
    const raw = m?.[3]?.toLowerCase() ?? '';
    const value = raw === 'nan' ? NaN : raw === '+inf' ? Infinity : raw === '-inf' ? -Infinity : Number(raw);
    if (!m || (Number.isNaN(value) && raw !== 'nan')) throw new Error(`metrics line ${i + 1} is not Prometheus text: ${line}`);
    const labels: Record<string, string> = {};
    for (const [, key, raw] of (m[2] ?? '').matchAll(LABEL)) labels[key!] = raw!.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
    samples.push({ name: m[1]!, labels, value });
  });
  return samples;
}

/** The sum of the samples named `name` whose labels include `labels` (0 when none). */
export function metricValue(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}

/** Fetches `/metrics` and parses it. */
export async function scrape(url: string, headers: Record<string, string> = {}): Promise<Sample[]> {
  const response = await fetch(`${url}/metrics`, { headers });
  if (response.status !== 200) throw new Error(`/metrics answered ${response.status}: ${await response.text()}`);
  return parsePrometheus(await response.text());
}
