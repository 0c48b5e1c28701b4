// The signed-in session: the bearer token in sessionStorage (never in a URL or a cookie),
// and what the page reads from its claims (subject, roles, expiry). The claims only
// decide which buttons to show; the server verifies the token and enforces every RPC.

const STORAGE_KEY = "sira.token";

export interface Session {
  token: string;
  subject: string;
  roles: string[];
  /** Seconds since the epoch, or null when the token has no exp claim. */
  expiresAt: number | null;
}

type Listener = (session: Session | null) => void;
const listeners = new Set<Listener>();

function decodeClaims(token: string): Record<string, unknown> | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const json = new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)));
    const claims: unknown = JSON.parse(json);
    return claims !== null && typeof claims === "object" ? (claims as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

/** Reads a session from a pasted token; null when it is not a JWT at all. */
export function parseToken(token: string): Session | null {
  const trimmed = token.trim();
  const claims = decodeClaims(trimmed);
  if (claims === null) return null;
  const rawRoles = claims["roles"];
  const roles = Array.isArray(rawRoles)
    ? rawRoles.filter((r): r is string => typeof r === "string")
    : typeof rawRoles === "string"
      ? rawRoles.split(/[\s,]+/).filter(Boolean)
      : [];
  const exp = claims["exp"];
  return {
    token: trimmed,
    subject: typeof claims["sub"] === "string" ? claims["sub"] : "",
    roles,
    expiresAt: typeof exp === "number" ? exp : null,
  };
}

export function isExpired(session: Session, nowSeconds = Date.now() / 1000): boolean {
  return session.expiresAt !== null && session.expiresAt <= nowSeconds;
}

export function currentSession(): Session | null {
  const token = sessionStorage.getItem(STORAGE_KEY);
  if (token === null) return null;
  const session = parseToken(token);
  if (session === null || isExpired(session)) {
    sessionStorage.removeItem(STORAGE_KEY);
    return null;
  }
  return session;
}

export function signIn(session: Session): void {
  sessionStorage.setItem(STORAGE_KEY, session.token);
  listeners.forEach((l) => l(session));
}

/** `reason` is shown on the sign-in page (for example "Your session expired"). */
export function signOut(reason?: string): void {
  sessionStorage.removeItem(STORAGE_KEY);
  if (reason) sessionStorage.setItem("sira.signout-reason", reason);
  listeners.forEach((l) => l(null));
}

export function takeSignOutReason(): string | null {
  const reason = sessionStorage.getItem("sira.signout-reason");
  sessionStorage.removeItem("sira.signout-reason");
  return reason;
}

export function onSessionChange(listener: Listener): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}
