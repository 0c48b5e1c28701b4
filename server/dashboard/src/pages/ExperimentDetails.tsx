import { useCallback, useEffect, useRef, useState } from "react";
import { Link, useParams } from "react-router";
import { insights as insightsClient, lifecycle } from "../clients";
import { AuditTrail } from "../components/AuditTrail";
import { ConversionBars, HistoryChart, PosteriorCurves, type HistoryPoint } from "../components/Charts";
import { ExperimentActions } from "../components/ExperimentActions";
import { ErrorBanner, Loading } from "../components/Feedback";
import { InsightsSummary } from "../components/InsightsSummary";
import { StatusBadge } from "../components/StatusBadge";
import { VariantsTable } from "../components/VariantsTable";
import { plainError } from "../errors";
import { when } from "../format";
import { ExperimentStatus, type Experiment } from "../gen/sira/experiments/v1/experiment_pb";
import type { GetInsightsResponse, GetResultsResponse } from "../gen/sira/experiments/v1/insights_service_pb";
import type { AuditEvent } from "../gen/sira/experiments/v1/lifecycle_service_pb";

const POLL_MS = 2000;
const MAX_POINTS = 600;

interface History {
  lastSamples: Record<string, bigint>;
  allocation: HistoryPoint[];
  probBest: HistoryPoint[];
}

// The API keeps no history of allocation or P(best): the page records them while it is open
// (kept per experiment for the life of the tab).
const histories = new Map<string, History>();

function record(id: string, r: GetInsightsResponse): History {
  const h = histories.get(id) ?? { lastSamples: {}, allocation: [], probBest: [] };
  const t = Date.now();
  const grown = r.insights.map((v) => ({ v, added: v.samples - (h.lastSamples[v.variantKey] ?? 0n) }));
  const added = grown.reduce((sum, g) => sum + g.added, 0n);
  const probBest: HistoryPoint = { t };
  for (const v of r.insights) probBest[v.variantKey] = v.probBest;
  const next: History = {
    lastSamples: Object.fromEntries(r.insights.map((v) => [v.variantKey, v.samples])),
    allocation: h.allocation,
    probBest: [...h.probBest, probBest].slice(-MAX_POINTS),
  };
  if (added > 0n && Object.keys(h.lastSamples).length > 0) {
    const point: HistoryPoint = { t };
    for (const g of grown) point[g.v.variantKey] = Number(g.added) / Number(added);
    next.allocation = [...h.allocation, point].slice(-MAX_POINTS);
  }
  histories.set(id, next);
  return next;
}

export function ExperimentDetails() {
  const { ref = "" } = useParams();
  const [experiment, setExperiment] = useState<Experiment | null>(null);
  const [insights, setInsights] = useState<GetInsightsResponse | null>(null);
  const [results, setResults] = useState<GetResultsResponse | null>(null);
  const [audit, setAudit] = useState<AuditEvent[] | null>(null);
  const [history, setHistory] = useState<History | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [updated, setUpdated] = useState<Date | null>(null);
  const ticks = useRef(0);

  const refresh = useCallback(
    async (withAudit: boolean) => {
      try {
        const [e, i, r] = await Promise.all([
          lifecycle.getExperiment({ experiment: ref }),
          insightsClient.getInsights({ experiment: ref }),
          insightsClient.getResults({ experiment: ref }),
        ]);
        setExperiment(e.experiment ?? null);
        setInsights(i);
        setResults(r);
        if (e.experiment && e.experiment.status !== ExperimentStatus.DRAFT) setHistory(record(e.experiment.id, i));
        if (withAudit) setAudit((await lifecycle.listAuditEvents({ experiment: ref, pageSize: 100 })).events);
        setError(null);
        setUpdated(new Date());
      } catch (err) {
        setError(plainError(err).message);
      }
    },
    [ref],
  );

  // Polls every 2 s while the page is open (the audit trail every 5th time and after actions).
  useEffect(() => {
    let stopped = false;
    let timer = 0;
    const loop = async () => {
      await refresh(ticks.current % 5 === 0);
      ticks.current += 1;
      if (!stopped) timer = window.setTimeout(loop, POLL_MS);
    };
    void loop();
    return () => {
      stopped = true;
      window.clearTimeout(timer);
    };
  }, [refresh]);

  if (!experiment || !insights) return error ? <ErrorBanner message={error} onRetry={() => void refresh(true)} /> : <Loading what="the experiment" />;

  const hasData = insights.insights.some((v) => v.samples > 0n);
  const showHistory =
    history !== null && (experiment.status === ExperimentStatus.RUNNING || history.probBest.length > 1);
  const t = experiment.targeting;
  const targeting = [
    t?.countries.length ? `countries ${t.countries.join(", ")}` : "",
    t?.languages.length ? `languages ${t.languages.join(", ")}` : "",
    t?.devices.length ? `devices ${t.devices.join(", ")}` : "",
    t?.userSegments.length ? `segments ${t.userSegments.join(", ")}` : "",
    t?.minTxn !== undefined ? `at least ${t.minTxn} transactions` : "",
    ...Object.entries(t?.attributes ?? {}).map(([k, v]) => `${k} in ${v.values.join(", ")}`),
  ].filter(Boolean);

  return (
    <article className="space-y-6" aria-labelledby="exp-title">
      <nav aria-label="Breadcrumb" className="text-sm">
        <Link to="/" className="text-blue-800 underline">
          ← Experiments
        </Link>
      </nav>
      <header className="flex flex-wrap items-start justify-between gap-3">
        <div className="space-y-1">
          <h1 id="exp-title" className="flex flex-wrap items-center gap-2 text-2xl font-semibold">
            {experiment.name} <StatusBadge status={experiment.status} />
          </h1>
          <p className="font-mono text-sm text-slate-600">{experiment.key}</p>
          {experiment.description && <p className="max-w-prose">{experiment.description}</p>}
          <p className="text-sm text-slate-600">
            Created {when(experiment.createTime)} by {experiment.createdBy || "—"}
            {experiment.startTime && <> · started {when(experiment.startTime)}</>} · Who: {targeting.length ? targeting.join("; ") : "everyone"} ·
            exposure {experiment.exposurePercent ?? 100} %
          </p>
        </div>
        <ExperimentActions experiment={experiment} onChanged={() => void refresh(true)} />
      </header>
      {error && <ErrorBanner message={`${error} (showing the last numbers received)`} />}
      <p className="text-xs text-slate-600" aria-live="polite">
        {experiment.status === ExperimentStatus.RUNNING ? "Live: refreshed every 2 s. " : ""}
        {updated && `Last update ${updated.toLocaleTimeString()}.`}
      </p>
      <InsightsSummary experiment={experiment} insights={insights} />
      <VariantsTable insights={insights} results={results} />
      {!hasData && (
        <p className="card text-slate-700" data-testid="no-data">
          No users yet: the charts appear once the experiment runs and users are assigned.
        </p>
      )}
      {(hasData || showHistory) && (
        <div className="grid gap-4 lg:grid-cols-2">
          {hasData && (
            <>
              <div className="card">
                <ConversionBars variants={insights.insights} />
              </div>
              <div className="card">
                <PosteriorCurves variants={insights.insights} />
              </div>
            </>
          )}
          {history && showHistory && (
            <>
              <div className="card">
                <HistoryChart title="Allocation over time" points={history.allocation} variants={insights.insights}
                  note="Share of the new users each variant received between two refreshes, recorded while this page is open." />
              </div>
              <div className="card">
                <HistoryChart title="P(best) over time" points={history.probBest} variants={insights.insights}
                  note="Probability that each variant is the best, recorded while this page is open." />
              </div>
            </>
          )}
        </div>
      )}
      <AuditTrail events={audit} />
    </article>
  );
}
