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
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { AllocationStrategy, ExperimentStatus, VariantState, type Experiment } from "../gen/sira/experiments/v1/experiment_pb";
import type {
  GetInsightsHistoryResponse,
  GetInsightsResponse,
  GetResultsResponse,
} from "../gen/sira/experiments/v1/insights_service_pb";
import type { AuditEvent } from "../gen/sira/experiments/v1/lifecycle_service_pb";

const POLL_MS = 2000;
const MAX_POINTS = 600;

interface History {
  allocation: HistoryPoint[];
  probBest: HistoryPoint[];
}

// The server records allocation and P(best) of running experiments (GetInsightsHistory, one
// point per SIRA_INSIGHTS_HISTORY_SECONDS); the page starts from those points and appends
// the ones it polls (kept per experiment for the life of the tab).
const histories = new Map<string, History>();

// The weights in force, as the server records them: P(a new user gets the variant).
// Thompson sampling gives the variant whose posterior draw is highest, i.e. P(best);
// fixed weights split over the active variants.
function allocationOf(e: Experiment, r: GetInsightsResponse): Record<string, number> {
  if (e.allocation === AllocationStrategy.FIXED_WEIGHTS) {
    const active = e.variants.filter((v) => v.state === VariantState.ACTIVE);
    const total = active.reduce((sum, v) => sum + v.weight, 0);
    return Object.fromEntries(e.variants.map((v) => [v.key, v.state === VariantState.ACTIVE && total > 0 ? v.weight / total : 0]));
  }
  return Object.fromEntries(r.insights.map((v) => [v.variantKey, v.probBest]));
}

function recorded(r: GetInsightsResponse, h: GetInsightsHistoryResponse): History {
  const keyOf = new Map(r.insights.map((v) => [v.variantId, v.variantKey]));
  const allocation: HistoryPoint[] = [];
  const probBest: HistoryPoint[] = [];
  for (const p of h.points) {
    if (!p.recordedAt) continue;
    const t = timestampMs(p.recordedAt);
    const a: HistoryPoint = { t };
    const b: HistoryPoint = { t };
    for (const v of p.variants) {
      const key = keyOf.get(v.variantId);
      if (key === undefined) continue;
      a[key] = v.allocation;
      b[key] = v.probBest;
    }
    allocation.push(a);
    probBest.push(b);
  }
  return { allocation, probBest };
}

function append(points: HistoryPoint[], point: HistoryPoint): HistoryPoint[] {
  const last = points[points.length - 1];
  return last && last.t >= point.t ? points : [...points, point].slice(-MAX_POINTS);
}

function record(id: string, e: Experiment, r: GetInsightsResponse, server?: GetInsightsHistoryResponse): History {
  const h = histories.get(id) ?? (server ? recorded(r, server) : { allocation: [], probBest: [] });
  const t = Date.now();
  const probBest: HistoryPoint = { t, ...Object.fromEntries(r.insights.map((v) => [v.variantKey, v.probBest])) };
  const next: History = {
    allocation: append(h.allocation, { t, ...allocationOf(e, r) }),
    probBest: append(h.probBest, probBest),
  };
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
        const exp = e.experiment;
        if (exp && exp.status !== ExperimentStatus.DRAFT) {
          // The recorded points once per experiment and tab, then only the polled ones.
          const server = histories.has(exp.id)
            ? undefined
            : await insightsClient.getInsightsHistory({ experiment: exp.id, maxPoints: MAX_POINTS });
          setHistory(record(exp.id, exp, i, server));
        }
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
                  note="Share of new users each variant gets (Thompson sampling: its P(best); fixed weights: its weight share), recorded by the server and updated while this page is open." />
              </div>
              <div className="card">
                <HistoryChart title="P(best) over time" points={history.probBest} variants={insights.insights}
                  note="Probability that each variant is the best, recorded by the server and updated while this page is open." />
              </div>
            </>
          )}
        </div>
      )}
      <AuditTrail events={audit} />
    </article>
  );
}
