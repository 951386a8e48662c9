// Builds the standalone C++ tests with CMake and runs them with ctest (every kernel test runs
// on both the AVX-512 and the AVX2 path), then the CUDA tests under the CPU emulation. Used by
// `npm test`.
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

// The CUDA sources only compile here with nvcc; the GPU tests run on a GPU machine (see README),
// and under the CPU emulation of CUDA here (scripts/cuda-emulate.sh; REDFLAG_NO_CUDA_EMULATION=1
// skips it).
step('cmake', ['-S', root, '-B', build, '-DCMAKE_BUILD_TYPE=Release', ...process.argv.slice(2)]);
step('cmake', ['--build', build, '-j', jobs]);
step('ctest', ['--test-dir', build, '--output-on-failure', '-j', jobs]);
if (process.env.REDFLAG_NO_CUDA_EMULATION !== '1') step('bash', [join(root, 'scripts', 'cuda-emulate.sh')]);
