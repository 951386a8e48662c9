// Lists the C++ sources of one native folder for binding.gyp (gyp has no globbing).
// Usage: node scripts/list-sources.mjs core dispatch model napi
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const files = [];
for (const dir of process.argv.slice(2)) {
  for (const name of readdirSync(join(root, 'native', dir)).sort()) {
    if (name.endsWith('.cpp')) files.push(`native/${dir}/${name}`);
  }
}
process.stdout.write(files.join(' '));
