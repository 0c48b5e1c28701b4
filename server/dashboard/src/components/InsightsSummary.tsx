import { ExperimentStatus, type Experiment } from "../gen/sira/experiments/v1/experiment_pb";
import { RecommendedAction, type GetInsightsResponse } from "../gen/sira/experiments/v1/insights_service_pb";
import { pct, when } from "../format";

const ACTION_WORDS: Record<RecommendedAction, string> = {
  [RecommendedAction.UNSPECIFIED]: "not started yet",
  [RecommendedAction.KEEP_RUNNING]: "Keep running",
  [RecommendedAction.STOP_WITH_WINNER]: "Stop: there is a winner",
  [RecommendedAction.DROP_VARIANTS]: "Drop the failing variants",
  [RecommendedAction.CONCLUDED]: "Concluded",
};

export function InsightsSummary({ experiment, insights }: { experiment: Experiment; insights: GetInsightsResponse }) {
  const name = (id: string) => insights.insights.find((v) => v.variantId === id)?.variant ?? id;
  const guardrails = insights.insights.flatMap((v) => v.guardrails.filter((g) => g.flagged).map((g) => ({ v, g })));
  const autoStop = experiment.failFast?.autoStop ?? false;
  const winner = experiment.winnerVariantId ? name(experiment.winnerVariantId) : null;
  return (
    <section aria-labelledby="reco-title" className="grid gap-4 md:grid-cols-2">
      <div className="card space-y-2" data-testid="recommendation">
        <h2 id="reco-title" className="font-semibold">
          Recommendation: {ACTION_WORDS[insights.action]}
        </h2>
        <p>{insights.recommendation}</p>
        {experiment.status === ExperimentStatus.STOPPED || experiment.status === ExperimentStatus.ARCHIVED ? (
          <p className="text-sm" data-testid="outcome">
            Stopped {when(experiment.stopTime)}. Winner: <strong>{winner ?? "none (everyone gets the control)"}</strong>
            {experiment.stopReason && <> · Reason: “{experiment.stopReason}”</>}
          </p>
        ) : null}
      </div>
      <div className="card space-y-2 text-sm">
        <h2 className="font-semibold">Safety checks</h2>
        <p>
          <strong>Fail-fast:</strong>{" "}
          {autoStop ? "automatic (failing variants are dropped and the experiment stops by itself)" : "report only"}; decides at
          an evidence of {insights.eValueThreshold.toFixed(0)} (error rate {pct(insights.errorRate)}), after {insights.minSamples.toString()} users per variant.{" "}
          {insights.failingVariantIds.length === 0 ? (
            <span>No variant fails.</span>
          ) : (
            <span className="font-medium text-red-800">
              ⚠ Failing: {insights.failingVariantIds.map(name).join(", ")}
            </span>
          )}
        </p>
        <p>
          <strong>Guardrails (refunds, churn):</strong>{" "}
          {guardrails.length === 0 ? (
            "none flagged."
          ) : (
            <span className="font-medium text-red-800">
              ⚠ {guardrails.map(({ v, g }) => `${v.variant}: ${g.metric} ${pct(g.rate)} (P(worse) ${pct(g.probWorseThanBest)})`).join("; ")}
            </span>
          )}
        </p>
        <p>
          <strong>Sample ratio (SRM):</strong>{" "}
          {!insights.srm?.applicable
            ? "not applicable (only for fixed weights)."
            : insights.srm.flagged
              ? <span className="font-medium text-red-800">⚠ the split does not match the weights (p = {insights.srm.pValue.toExponential(1)}).</span>
              : `the split matches the weights (p = ${insights.srm.pValue.toFixed(3)}).`}
        </p>
      </div>
    </section>
  );
}
