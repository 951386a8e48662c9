import { loadNative } from '../../lib/native.js';

/** Whether this machine can run the CUDA engine at all (a GPU machine with the CUDA build). */
export function cudaUsable(): boolean {
  try {
    return (loadNative('cuda').cudaInfo?.().count ?? 0) > 0;
  } catch {
    return false;
  }
}
