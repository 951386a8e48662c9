// `npm run build:cuda`: builds the addon with cmake-js into build-cuda/, compiling the CUDA
// sources when nvcc is found (CPU-only otherwise). Load it with REDFLAG_BACKEND=cuda.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const cmakeJs = join(root, 'node_modules', '.bin', 'cmake-js');
const r = spawnSync(
  cmakeJs,
  ['build', '--out', 'build-cuda', '--CDREDFLAG_ADDON=ON', '--CDREDFLAG_TESTS=OFF', ...process.argv.slice(2)],
  { stdio: 'inherit', cwd: root },
);
process.exit(r.status ?? 1);
