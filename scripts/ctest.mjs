// Builds the standalone C++ tests with CMake and runs them with ctest (every kernel test runs
// on both the AVX-512 and the AVX2 path). Used by `npm test`.
import { spawnSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const build = join(root, 'build-native');
const jobs = String(availableParallelism());

function step(cmd, args) {
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root });
  if (r.error) {
    console.error(`${cmd}: ${r.error.message}`);
    process.exit(1);
  }
  if (r.status !== 0) process.exit(r.status ?? 1);
}

// The CUDA sources only compile here; the GPU tests run on a GPU machine (see README).
step('cmake', ['-S', root, '-B', build, '-DCMAKE_BUILD_TYPE=Release', ...process.argv.slice(2)]);
step('cmake', ['--build', build, '-j', jobs]);
step('ctest', ['--test-dir', build, '--output-on-failure', '-j', jobs]);
