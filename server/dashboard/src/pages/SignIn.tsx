import { useEffect, useId, useState } from "react";
import { useLocation, useNavigate } from "react-router";
import { isExpired, parseToken, signIn, takeSignOutReason } from "../auth";

interface DevRoles {
  roles: string[];
}

// Paste a JWT, or (embedded default only: the server holds its development secret) pick a
// role and let the server mint a short-lived token.
export function SignIn() {
  const navigate = useNavigate();
  const location = useLocation();
  const from = (location.state as { from?: string } | null)?.from;
  const [reason] = useState(() => takeSignOutReason());
  const [token, setToken] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [devRoles, setDevRoles] = useState<string[] | null>(null);
  const [role, setRole] = useState("marketing");
  const [busy, setBusy] = useState(false);
  const tokenId = useId();
  const roleId = useId();

  useEffect(() => {
    let cancelled = false;
    fetch("/dev/sign-in", { headers: { Accept: "application/json" } })
      .then(async (r) => (r.ok ? ((await r.json()) as DevRoles) : null))
      .then((body) => {
        if (!cancelled && body && Array.isArray(body.roles)) {
          setDevRoles(body.roles);
          if (!body.roles.includes("marketing") && body.roles.length > 0) setRole(body.roles[0]);
        }
      })
      .catch(() => undefined);
    return () => {
      cancelled = true;
    };
  }, []);

  const done = () => navigate(from && from !== "/sign-in" ? from : "/", { replace: true });

  const usePasted = (e: React.FormEvent) => {
    e.preventDefault();
    const session = parseToken(token);
    if (session === null) return setError("This is not a JWT: it should be three parts separated by dots.");
    if (isExpired(session)) return setError("This token has expired. Ask for a new one.");
    signIn(session);
    done();
  };

  const devSignIn = async (e: React.FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const r = await fetch("/dev/sign-in", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ role }),
      });
      if (!r.ok) throw new Error(`The server refused the development sign-in (HTTP ${r.status}).`);
      const body = (await r.json()) as { token?: string };
      const session = body.token ? parseToken(body.token) : null;
      if (session === null) throw new Error("The server answered without a usable token.");
      signIn(session);
      done();
    } catch (err) {
      setError(err instanceof Error ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="mx-auto max-w-xl space-y-6">
      <h1 className="text-2xl font-semibold">Sign in</h1>
      {reason && (
        <p role="status" className="rounded border border-amber-300 bg-amber-50 p-3 text-amber-900">
          {reason}
        </p>
      )}
      {error && (
        <p role="alert" className="rounded border border-red-300 bg-red-50 p-3 text-red-900">
          {error}
        </p>
      )}
      {devRoles && (
        <form onSubmit={devSignIn} className="card space-y-3" aria-labelledby="dev-title">
          <h2 id="dev-title" className="font-semibold">
            Development sign-in
          </h2>
          <p className="text-sm text-slate-600">
            This server runs with its development secret: it can give you a short-lived token for any role.
          </p>
          <div>
            <label htmlFor={roleId} className="field-label">
              Role
            </label>
            <select id={roleId} className="field-input" value={role} onChange={(e) => setRole(e.target.value)}>
              {devRoles.map((r) => (
                <option key={r} value={r}>
                  {r}
                </option>
              ))}
            </select>
          </div>
          <button type="submit" className="btn-primary" disabled={busy}>
            {busy ? "Signing in…" : "Sign in with this role"}
          </button>
        </form>
      )}
      <form onSubmit={usePasted} className="card space-y-3" aria-labelledby="token-title">
        <h2 id="token-title" className="font-semibold">
          Sign in with a token
        </h2>
        <div>
          <label htmlFor={tokenId} className="field-label">
            JWT (from your identity provider, or <code>sira-server token --role marketing</code>)
          </label>
          <textarea
            id={tokenId}
            className="field-input font-mono text-xs"
            rows={4}
            value={token}
            onChange={(e) => setToken(e.target.value)}
            autoComplete="off"
            spellCheck={false}
            required
          />
        </div>
        <button type="submit" className="btn-primary">
          Sign in
        </button>
        <p className="text-xs text-slate-600">The token stays in this browser tab only (session storage) and is sent to SIRA with each request.</p>
      </form>
    </div>
  );
}
