import { useEffect, useState } from "react";
import { Link, Navigate, Route, Routes, useLocation, useNavigate } from "react-router";
import { currentSession, onSessionChange, signOut, type Session } from "./auth";
import { ExperimentDetails } from "./pages/ExperimentDetails";
import { ExperimentForm } from "./pages/ExperimentForm";
import { ExperimentsList } from "./pages/ExperimentsList";
import { SignIn } from "./pages/SignIn";

export function App() {
  const [session, setSession] = useState<Session | null>(() => currentSession());
  const navigate = useNavigate();
  const location = useLocation();
  useEffect(
    () =>
      onSessionChange((s) => {
        setSession(s);
        if (s === null) navigate("/sign-in", { state: { from: location.pathname } });
      }),
    [navigate, location.pathname],
  );
  // A token that expires while the page is open leads back to sign-in without waiting for an RPC.
  useEffect(() => {
    if (session?.expiresAt == null) return;
    const ms = session.expiresAt * 1000 - Date.now();
    const timer = window.setTimeout(() => signOut("Your session has expired. Please sign in again."), Math.max(ms, 0));
    return () => window.clearTimeout(timer);
  }, [session]);

  return (
    <>
      <a href="#main" className="sr-only focus:not-sr-only focus:absolute focus:left-2 focus:top-2 focus:z-50 focus:rounded focus:bg-white focus:p-2">
        Skip to content
      </a>
      <header className="border-b border-slate-200 bg-white">
        <div className="mx-auto flex max-w-6xl flex-wrap items-center justify-between gap-2 px-4 py-3">
          <Link to="/" className="text-lg font-bold text-slate-900">
            SIRA <span className="font-normal text-slate-600">experiments</span>
          </Link>
          {session && (
            <div className="flex flex-wrap items-center gap-3 text-sm">
              <span data-testid="who">
                {session.subject || "signed in"} · <span className="text-slate-600">{session.roles.join(", ") || "no role"}</span>
              </span>
              <button type="button" className="btn-secondary" onClick={() => signOut()}>
                Sign out
              </button>
            </div>
          )}
        </div>
      </header>
      <main id="main" className="mx-auto max-w-6xl px-4 py-6">
        <Routes>
          <Route path="/sign-in" element={<SignIn />} />
          <Route path="/" element={session ? <ExperimentsList /> : <Navigate to="/sign-in" replace />} />
          <Route path="/experiments/new" element={session ? <ExperimentForm /> : <Navigate to="/sign-in" replace />} />
          <Route path="/experiments/:ref/edit" element={session ? <ExperimentForm /> : <Navigate to="/sign-in" replace />} />
          <Route path="/experiments/:ref" element={session ? <ExperimentDetails /> : <Navigate to="/sign-in" replace />} />
          <Route path="*" element={<p>This page does not exist. <Link className="underline" to="/">Back to the experiments</Link></p>} />
        </Routes>
      </main>
    </>
  );
}
