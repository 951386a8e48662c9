/**
 * The one error type redflag throws for bad input, bad files and misuse. The message
 * always names what is wrong and where (file, field, line); `code` lets callers branch.
 */
export type RedflagErrorCode =
  | 'INVALID_ARGUMENT'
  | 'INVALID_FILE'
  | 'UNSUPPORTED'
  | 'NOT_FOUND'
  | 'NATIVE'
  | 'ABORTED'
  | 'DISPOSED'
  | 'NO_TOKENIZER'
  /** A detector's queue is full: try again later. */
  | 'BUSY'
  /** A request could never fit the configured limits (e.g. the KV-cache budget). */
  | 'TOO_LARGE'
  /**
   * Device (GPU) or host memory ran out. Nothing was changed: the same call with less work
   * (a smaller batch, kvCacheBytes or model, dtype bf16) may succeed.
   */
  | 'OUT_OF_MEMORY'
  /**
   * The GPU failed (a fault in a kernel, an uncorrectable memory error): its CUDA context is
   * lost, and nothing more runs on it in this process. A detector stays failed (the server's
   * `/health` answers 503 `failed`); start a new process, and resume training from its last
   * checkpoint.
   */
  | 'DEVICE_FAILED';

/**
 * Characters a terminal may act on, which error messages quoting file contents must not carry
 * raw: C0 controls but tab and newline (ESC starts escape sequences), DEL, C1 controls (0x9b is
 * an 8-bit CSI), the line/paragraph separators and the bidirectional overrides.
 */
const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** `text` with every {@link CONTROL} character written as a `\uXXXX` escape. */
export function escapeControl(text: string): string {
  return text.replace(CONTROL, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/** A value read from a file, quoted for an error message: JSON string escapes, control characters escaped, at most `max` characters. */
export function quoteText(value: string, max = 80): string {
  return escapeControl(JSON.stringify(value.length > max ? `${value.slice(0, max)}…` : value));
}

export class RedflagError extends Error {
  readonly code: RedflagErrorCode;
  /** The file the error is about, when there is one. */
  readonly file: string | undefined;

  constructor(code: RedflagErrorCode, message: string, options: { file?: string; cause?: unknown } = {}) {
    // Messages quote file names and contents: no control character reaches a terminal raw.
    super(escapeControl(options.file ? `${options.file}: ${message}` : message), { cause: options.cause });
    this.name = 'RedflagError';
    this.code = code;
    this.file = options.file;
  }
}

/** The error an aborted operation rejects with (AbortSignal's reason when it is an Error). */
export function abortError(signal: AbortSignal | undefined): Error {
  const reason: unknown = signal?.reason;
  if (reason instanceof Error) return reason;
  return new RedflagError('ABORTED', 'the operation was aborted');
}
