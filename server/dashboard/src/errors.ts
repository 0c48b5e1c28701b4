// Server errors in words a marketer understands, from the machine-readable reason
// (google.rpc.ErrorInfo, protos/sira/experiments/v1/error_reason.proto) and the field
// violations of a google.rpc.BadRequest (shown next to their fields by the form).
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb";

export interface FieldViolation {
  field: string;
  description: string;
}

export interface PlainError {
  /** The sentence to show. */
  message: string;
  reason: string;
  violations: FieldViolation[];
}

const REASONS: Record<string, (meta: Record<string, string>) => string> = {
  ERROR_REASON_INVALID_ARGUMENT: () => "Some values are not valid. Check the highlighted fields.",
  ERROR_REASON_EXPERIMENT_NOT_FOUND: (m) =>
    `No experiment "${m["experiment"] ?? ""}" exists (it may have been deleted).`,
  ERROR_REASON_EXPERIMENT_KEY_EXISTS: (m) =>
    `Another experiment already uses the key "${m["key"] ?? ""}". Choose a different key.`,
  ERROR_REASON_INVALID_EXPERIMENT_STATE: (m) =>
    `This cannot be done while the experiment is ${statusWord(m["status"])}` +
    (m["allowed_statuses"] ? ` (only when ${m["allowed_statuses"].split(",").map(statusWord).join(" or ")}).` : "."),
  ERROR_REASON_VARIANT_NOT_FOUND: (m) => `The variant "${m["variant"] ?? ""}" is not part of this experiment.`,
  ERROR_REASON_TOKEN_MISSING: () => "You are not signed in.",
  ERROR_REASON_TOKEN_INVALID: () => "Your sign-in token is not valid. Please sign in again.",
  ERROR_REASON_TOKEN_EXPIRED: () => "Your session has expired. Please sign in again.",
  ERROR_REASON_ROLE_NOT_ALLOWED: (m) =>
    `Your role may not do this` + (m["required_roles"] ? ` (needs ${m["required_roles"].split(",").join(" or ")}).` : "."),
  ERROR_REASON_STORE_UNAVAILABLE: () =>
    "SIRA cannot save right now because one of its databases is unavailable. Try again in a moment.",
  ERROR_REASON_RATE_LIMITED: () => "Too many requests right now. Wait a few seconds and try again.",
  ERROR_REASON_INVALID_PAGE_TOKEN: () => "This list page is out of date. Go back to the first page.",
  ERROR_REASON_INTERNAL: () => "SIRA hit an unexpected problem. The details are in the server log.",
};

function statusWord(status: string | undefined): string {
  return (status ?? "").replace(/^EXPERIMENT_STATUS_/, "").toLowerCase() || "in another state";
}

const BY_CODE: Partial<Record<Code, string>> = {
  [Code.Unavailable]: "SIRA cannot be reached. Check your connection and try again.",
  [Code.DeadlineExceeded]: "SIRA took too long to answer. Try again.",
  [Code.Unauthenticated]: "Please sign in again.",
  [Code.PermissionDenied]: "Your role may not do this.",
  [Code.NotFound]: "Not found.",
  [Code.ResourceExhausted]: "Too many requests right now. Wait a few seconds and try again.",
};

export function plainError(err: unknown): PlainError {
  const error = ConnectError.from(err);
  const info = error.findDetails(ErrorInfoSchema)[0];
  const violations = error
    .findDetails(BadRequestSchema)
    .flatMap((br) => br.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
  const reason = info?.reason ?? "";
  const words = REASONS[reason];
  const message = words
    ? words(info?.metadata ?? {})
    : (BY_CODE[error.code] ?? `Something went wrong: ${error.rawMessage || "unknown error"}.`);
  return { message, reason, violations };
}
