import { pct, signedPct } from "../format";
import { VariantState } from "../gen/sira/experiments/v1/experiment_pb";
import type { GetInsightsResponse, GetResultsResponse } from "../gen/sira/experiments/v1/insights_service_pb";

function money(n: number, currency: string): string {
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(n);
  } catch {
    return `${n.toFixed(2)} ${currency}`;
  }
}

export function VariantsTable({ insights, results }: { insights: GetInsightsResponse; results: GetResultsResponse | null }) {
  const revenueOf = new Map(results?.variants.map((r) => [r.variantId, r.revenue]) ?? []);
  return (
    <div className="overflow-x-auto rounded-lg border border-slate-200 bg-white">
      <table className="min-w-full text-right text-sm tabular-nums" data-testid="variants-table">
        <caption className="p-2 text-left font-semibold">
          Variants <span className="text-xs font-normal text-slate-600 md:hidden">(scroll sideways for every column)</span>
        </caption>
        <thead className="bg-slate-100 text-slate-700">
          <tr>
            <th scope="col" className="px-2 py-2 text-left">Variant</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">Users</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">Conversions</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">Rate</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">95 % interval</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">P(best)</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">P(worse than best)</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">Expected loss</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">Lift vs control</th>
            <th scope="col" className="whitespace-nowrap px-2 py-2">Revenue</th>
          </tr>
        </thead>
        <tbody>
          {insights.insights.map((v) => {
            const leading = v.variantId === insights.leadingVariantId;
            const revenue = revenueOf.get(v.variantId) ?? [];
            return (
              <tr key={v.variantId} className="border-t border-slate-200" data-variant={v.variantKey}>
                <th scope="row" className="px-2 py-2 text-left font-medium">
                  {v.variant}
                  <div className="flex flex-wrap gap-1 text-xs font-normal">
                    {v.isControl && <span className="rounded bg-slate-200 px-1">control</span>}
                    {leading && <span className="rounded bg-emerald-100 px-1 text-emerald-900">★ leading</span>}
                    {v.state === VariantState.DROPPED && <span className="rounded bg-red-100 px-1 text-red-900">✕ dropped</span>}
                    {v.failsFast && <span className="rounded bg-red-100 px-1 text-red-900">fails fast</span>}
                  </div>
                </th>
                <td className="whitespace-nowrap px-2 py-2" data-col="samples">{v.samples.toString()}</td>
                <td className="whitespace-nowrap px-2 py-2" data-col="conversions">{v.conversions.toString()}</td>
                <td className="whitespace-nowrap px-2 py-2" data-col="rate">{pct(v.conversionRate, 2)}</td>
                <td className="whitespace-nowrap px-2 py-2" data-col="interval">
                  {pct(v.confidenceInterval?.lower ?? 0, 2)} – {pct(v.confidenceInterval?.upper ?? 0, 2)}
                </td>
                <td className="whitespace-nowrap px-2 py-2" data-col="prob-best">{pct(v.probBest)}</td>
                <td className="whitespace-nowrap px-2 py-2" data-col="prob-worse">{pct(v.probWorseThanBest)}</td>
                <td className="whitespace-nowrap px-2 py-2" data-col="expected-loss">{pct(v.expectedLoss, 2)}</td>
                <td className="whitespace-nowrap px-2 py-2" data-col="lift">
                  {v.lift === undefined ? "—" : (
                    <>
                      {signedPct(v.lift)}
                      <div className="text-xs text-slate-600">
                        {signedPct(v.liftInterval?.lower ?? 0)} to {signedPct(v.liftInterval?.upper ?? 0)}
                      </div>
                    </>
                  )}
                </td>
                <td className="whitespace-nowrap px-2 py-2" data-col="revenue">
                  {revenue.length === 0
                    ? "—"
                    : revenue.map((r) => (
                        <div key={r.currency}>
                          {money(r.total, r.currency)}
                          <div className="text-xs text-slate-600">{money(r.perAssignedSubject, r.currency)} / user</div>
                        </div>
                      ))}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
    </div>
  );
}
