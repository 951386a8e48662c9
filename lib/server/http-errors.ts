/**
 * Errors in OpenAI's shape, `{ error: { message, type, param, code } }`, and the mapping from
 * everything the server can throw (request validation, Fastify, the detector) to a status code
 * and that body.
 * @module
 */
import type { z } from 'zod';

import { RedflagError } from '../errors.js';

/** The body of every error response. */
export interface ApiErrorBody {
  error: { message: string; type: 'invalid_request_error' | 'server_error'; param: string | null; code: string | null };
}

/** An error the server answers as is: status, message, the offending request field, a code. */
export class ApiError extends Error {
  readonly status: number;
  readonly param: string | null;
  readonly code: string | null;

  constructor(status: number, message: string, options: { param?: string | null; code?: string | null } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.param = options.param ?? null;
    this.code = options.code ?? null;
  }

  toBody(): ApiErrorBody {
    return {
      error: {
        message: this.message,
        type: this.status >= 500 ? 'server_error' : 'invalid_request_error',
        param: this.param,
        code: this.code,
      },
    };
  }
}

/** A zod path as OpenAI names fields: `messages[0].content`. */
export function formatParam(path: readonly PropertyKey[]): string | null {
  let param = '';
  for (const key of path) {
    if (typeof key === 'number') param += `[${key}]`;
    else param += param === '' ? String(key) : `.${String(key)}`;
  }
  return param === '' ? null : param;
}

/** Parses a request body, or throws a 400 naming the first bad field. */
export function parseBody<T>(schema: z.ZodType<T>, body: unknown): T {
  const result = schema.safeParse(body);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const param = issue ? formatParam(issue.path) : null;
  const reason = issue?.message ?? 'invalid request body';
  throw new ApiError(400, param ? `${param}: ${reason}` : `request body: ${reason}`, {
    param,
    code: issue?.code === 'too_big' ? 'limit_exceeded' : 'invalid_value',
  });
}

/** Errors Fastify raises itself while reading a request, by their `code`. */
const FASTIFY_CODES: Record<string, string> = {
  FST_ERR_CTP_BODY_TOO_LARGE: 'request_too_large',
  FST_ERR_CTP_INVALID_JSON_BODY: 'invalid_json',
  FST_ERR_CTP_EMPTY_JSON_BODY: 'invalid_json',
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'unsupported_media_type',
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: 'invalid_content_length',
};

/**
 * Maps anything thrown while serving a request to the error to answer. Unexpected errors become
 * a bare 500: their messages and stacks may name files and internals a client has no business
 * seeing (the server's log has them).
 */
export function toApiError(error: unknown): ApiError {
  if (error instanceof ApiError) return error;
  if (error instanceof RedflagError) {
    switch (error.code) {
      case 'BUSY':
        return new ApiError(429, error.message, { code: 'rate_limit_exceeded' });
      case 'TOO_LARGE':
        return new ApiError(400, error.message, { param: 'messages', code: 'context_length_exceeded' });
      case 'INVALID_ARGUMENT':
        return new ApiError(400, error.message, { code: 'invalid_value' });
      case 'ABORTED':
        // Only a disconnected client aborts a request, so nobody reads this; nginx's "client closed request".
        return new ApiError(499, 'the request was cancelled', { code: 'cancelled' });
      case 'DISPOSED':
        return new ApiError(503, 'the server is shutting down', { code: 'unavailable' });
      case 'OUT_OF_MEMORY':
        // Even alone (the scheduler splits steps first) the request did not fit the GPU's memory
        // now: others' requests may be holding it. The sizes stay in the server's log.
        return new ApiError(503, 'the server has no memory for this request now: try again later, or with a shorter prompt or max_tokens', {
          code: 'out_of_memory',
        });
      case 'DEVICE_FAILED':
        // For good: /health is 503 `failed` too, so that the supervisor restarts the process.
        return new ApiError(503, 'the server\'s GPU failed: it must be restarted (see its log)', { code: 'device_failed' });
      default:
        return new ApiError(500, 'internal server error', { code: 'internal_error' });
    }
  }
  const fastifyError = error as { code?: unknown; statusCode?: unknown; message?: unknown };
  const status = typeof fastifyError.statusCode === 'number' ? fastifyError.statusCode : 500;
  if (status >= 400 && status < 500) {
    const code = typeof fastifyError.code === 'string' ? (FASTIFY_CODES[fastifyError.code] ?? null) : null;
    const message = typeof fastifyError.message === 'string' ? fastifyError.message : 'bad request';
    return new ApiError(status, message, { code });
  }
  return new ApiError(500, 'internal server error', { code: 'internal_error' });
}
