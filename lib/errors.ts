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
  | 'TOO_LARGE';

export class RedflagError extends Error {
  readonly code: RedflagErrorCode;
  /** The file the error is about, when there is one. */
  readonly file: string | undefined;

  constructor(code: RedflagErrorCode, message: string, options: { file?: string; cause?: unknown } = {}) {
    super(options.file ? `${options.file}: ${message}` : message, { cause: options.cause });
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
