import { useCallback, useEffect, useId, useState } from "react";
import { Link } from "react-router";
import { insights, lifecycle } from "../clients";
import { ErrorBanner, Loading } from "../components/Feedback";
import { StatusBadge } from "../components/StatusBadge";
import { plainError } from "../errors";
import { pct, when } from "../format";
import { ExperimentStatus, type Experiment } from "../gen/sira/experiments/v1/experiment_pb";
import { may } from "../rbac";

const PAGE_SIZE = 20;
const SEARCH_SCAN_LIMIT = 1000;

const FILTERS: { label: string; status: ExperimentStatus }[] = [
  { label: "All", status: ExperimentStatus.UNSPECIFIED },
  { label: "Draft", status: ExperimentStatus.DRAFT },
  { label: "Running", status: ExperimentStatus.RUNNING },
  { label: "Stopped", status: ExperimentStatus.STOPPED },
  { label: "Archived", status: ExperimentStatus.ARCHIVED },
];

interface Leader {
  name: string;
  probBest: number;
}

function matches(e: Experiment, query: string): boolean {
  const q = query.trim().toLowerCase();
  return q === "" || e.key.toLowerCase().includes(q) || e.name.toLowerCase().includes(q);
}

export function ExperimentsList() {
  const [status, setStatus] = useState(ExperimentStatus.UNSPECIFIED);
  const [query, setQuery] = useState("");
  const [appliedQuery, setAppliedQuery] = useState("");
  // Page tokens of the pages before the current one (server-side pagination).
  const [tokens, setTokens] = useState<string[]>([""]);
  const [rows, setRows] = useState<Experiment[] | null>(null);
  const [next, setNext] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [leaders, setLeaders] = useState<Record<string, Leader | null>>({});
  const searchId = useId();
  const statusId = useId();
  const pageToken = tokens[tokens.length - 1];

  const load = useCallback(async () => {
    setRows(null);
    setError(null);
    try {
      if (appliedQuery.trim() === "") {
        const page = await lifecycle.listExperiments({ status, pageSize: PAGE_SIZE, pageToken });
        setRows(page.experiments);
        setNext(page.nextPageToken);
      } else {
        // The API has no text search: scan the newest experiments and filter here.
        const found: Experiment[] = [];
        let token = "";
        let scanned = 0;
        do {
          const page = await lifecycle.listExperiments({ status, pageSize: 100, pageToken: token });
          scanned += page.experiments.length;
          found.push(...page.experiments.filter((e) => matches(e, appliedQuery)));
          token = page.nextPageToken;
        } while (token !== "" && scanned < SEARCH_SCAN_LIMIT);
        setRows(found);
        setNext("");
      }
    } catch (err) {
      setError(plainError(err).message);
    }
  }, [status, pageToken, appliedQuery]);

  useEffect(() => {
    void load();
  }, [load]);

  // Leading variant and its P(best), for experiments that have data.
  useEffect(() => {
    if (!rows) return;
    let cancelled = false;
    const wanted = rows.filter((e) => e.status !== ExperimentStatus.DRAFT && !(e.id in leaders));
    void Promise.all(
      wanted.map(async (e) => {
        try {
          const r = await insights.getInsights({ experiment: e.id });
          const lead = r.insights.find((v) => v.variantId === r.leadingVariantId);
          return [e.id, lead ? { name: lead.variant, probBest: lead.probBest } : null] as const;
        } catch {
          return [e.id, null] as const;
        }
      }),
    ).then((pairs) => {
      if (!cancelled && pairs.length > 0) setLeaders((old) => ({ ...old, ...Object.fromEntries(pairs) }));
    });
    return () => {
      cancelled = true;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [rows]);

  return (
    <section aria-labelledby="list-title" className="space-y-4">
      <div className="flex flex-wrap items-center justify-between gap-3">
        <h1 id="list-title" className="text-2xl font-semibold">
          Experiments
        </h1>
        {may("CreateExperiment") && (
          <Link to="/experiments/new" className="btn-primary">
            <span aria-hidden="true">+</span> New experiment
          </Link>
        )}
      </div>
      <div className="flex flex-wrap items-end gap-4">
        <fieldset>
          <legend className="field-label" id={statusId}>
            Status
          </legend>
          <div className="mt-1 flex flex-wrap gap-1" role="group" aria-labelledby={statusId}>
            {FILTERS.map((f) => (
              <button
                key={f.label}
                type="button"
                aria-pressed={status === f.status}
                className={status === f.status ? "btn-primary" : "btn-secondary"}
                onClick={() => {
                  setStatus(f.status);
                  setTokens([""]);
                }}
              >
                {f.label}
              </button>
            ))}
          </div>
        </fieldset>
        <form
          role="search"
          className="flex items-end gap-2"
          onSubmit={(e) => {
            e.preventDefault();
            setAppliedQuery(query);
            setTokens([""]);
          }}
        >
          <div>
            <label htmlFor={searchId} className="field-label">
              Search by key or name
            </label>
            <input id={searchId} type="search" className="field-input" value={query} onChange={(e) => setQuery(e.target.value)} />
          </div>
          <button type="submit" className="btn-secondary">
            Search
          </button>
        </form>
      </div>
      {error && <ErrorBanner message={error} onRetry={() => void load()} />}
      {rows === null && !error && <Loading what="experiments" />}
      {rows !== null && rows.length === 0 && <p className="card text-slate-700">No experiments match.</p>}
      {rows !== null && rows.length > 0 && (
        <div className="overflow-x-auto rounded-lg border border-slate-200 bg-white">
          <table className="min-w-full text-left text-sm">
            <caption className="sr-only">Experiments, newest first</caption>
            <thead className="bg-slate-100 text-slate-700">
              <tr>
                <th scope="col" className="px-3 py-2">Name</th>
                <th scope="col" className="px-3 py-2">Status</th>
                <th scope="col" className="hidden px-3 py-2 sm:table-cell">Variants</th>
                <th scope="col" className="px-3 py-2">Leading</th>
                <th scope="col" className="px-3 py-2">P(best)</th>
                <th scope="col" className="hidden px-3 py-2 md:table-cell">Created</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((e) => {
                const leader = leaders[e.id];
                return (
                  <tr key={e.id} className="border-t border-slate-200" data-key={e.key}>
                    <td className="px-3 py-2">
                      <Link to={`/experiments/${e.key}`} className="font-medium text-blue-800 underline">
                        {e.name}
                      </Link>
                      <div className="font-mono text-xs text-slate-600">{e.key}</div>
                    </td>
                    <td className="px-3 py-2">
                      <StatusBadge status={e.status} />
                    </td>
                    <td className="hidden px-3 py-2 sm:table-cell">{e.variants.length}</td>
                    <td className="px-3 py-2">{leader ? leader.name : "—"}</td>
                    <td className="whitespace-nowrap px-3 py-2 tabular-nums">{leader ? pct(leader.probBest) : "—"}</td>
                    <td className="hidden px-3 py-2 md:table-cell">{when(e.createTime)}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
      {appliedQuery.trim() === "" && (
        <nav aria-label="Pages" className="flex items-center gap-2">
          <button type="button" className="btn-secondary" disabled={tokens.length <= 1} onClick={() => setTokens((t) => t.slice(0, -1))}>
            ← Previous
          </button>
          <span className="text-sm text-slate-600">Page {tokens.length}</span>
          <button type="button" className="btn-secondary" disabled={next === ""} onClick={() => setTokens((t) => [...t, next])}>
            Next →
          </button>
        </nav>
      )}
    </section>
  );
}
