// The experiment page's charts. They are hidden from screen readers: the variants table
// next to them carries the same numbers as text. Series differ by dash pattern as well as
// colour, and the legend names them.
import {
  Bar,
  BarChart,
  CartesianGrid,
  Cell,
  ErrorBar,
  Legend,
  Line,
  LineChart,
  ResponsiveContainer,
  Tooltip,
  XAxis,
  YAxis,
} from "recharts";
import { pct, SERIES_COLOURS, SERIES_DASHES } from "../format";
import type { VariantInsight } from "../gen/sira/experiments/v1/insights_service_pb";
import { densityCurves } from "../stats";

const pctTick = (v: number) => `${(v * 100).toFixed(v < 0.1 ? 1 : 0)}%`;

export function ConversionBars({ variants }: { variants: VariantInsight[] }) {
  const data = variants.map((v) => ({
    name: v.variant,
    rate: v.conversionRate,
    ci: [v.conversionRate - (v.confidenceInterval?.lower ?? v.conversionRate), (v.confidenceInterval?.upper ?? v.conversionRate) - v.conversionRate],
  }));
  return (
    <figure aria-labelledby="bars-caption">
      <figcaption id="bars-caption" className="mb-2 font-semibold">
        Conversion rate per variant, with its 95 % credible interval
      </figcaption>
      <div className="h-64" aria-hidden="true">
        <ResponsiveContainer width="100%" height="100%">
          <BarChart data={data} margin={{ top: 8, right: 8, bottom: 8, left: 8 }}>
            <CartesianGrid strokeDasharray="3 3" vertical={false} />
            <XAxis dataKey="name" tick={{ fontSize: 12 }} interval={0} />
            <YAxis tickFormatter={pctTick} width={48} />
            <Tooltip formatter={(v) => pct(Number(v), 2)} />
            <Bar dataKey="rate" name="Conversion rate" isAnimationActive={false}>
              {data.map((_, i) => (
                <Cell key={i} fill={SERIES_COLOURS[i % SERIES_COLOURS.length]} />
              ))}
              <ErrorBar dataKey="ci" width={10} strokeWidth={2} stroke="#111827" />
            </Bar>
          </BarChart>
        </ResponsiveContainer>
      </div>
    </figure>
  );
}

export function PosteriorCurves({ variants }: { variants: VariantInsight[] }) {
  const posteriors = variants.map((v) => ({
    key: v.variantKey,
    a: 1 + Number(v.conversions),
    b: 1 + Number(v.samples - v.conversions),
  }));
  const data = densityCurves(posteriors);
  return (
    <figure aria-labelledby="density-caption">
      <figcaption id="density-caption" className="mb-2 font-semibold">
        How sure we are of each rate (posterior density)
      </figcaption>
      <div className="h-64" aria-hidden="true">
        <ResponsiveContainer width="100%" height="100%">
          <LineChart data={data} margin={{ top: 8, right: 8, bottom: 8, left: 8 }}>
            <CartesianGrid strokeDasharray="3 3" vertical={false} />
            <XAxis dataKey="x" type="number" domain={["dataMin", "dataMax"]} tickFormatter={pctTick} />
            <YAxis hide />
            <Legend />
            {variants.map((v, i) => (
              <Line
                key={v.variantKey}
                dataKey={v.variantKey}
                name={v.variant}
                dot={false}
                isAnimationActive={false}
                stroke={SERIES_COLOURS[i % SERIES_COLOURS.length]}
                strokeDasharray={SERIES_DASHES[i % SERIES_DASHES.length]}
                strokeWidth={2}
              />
            ))}
          </LineChart>
        </ResponsiveContainer>
      </div>
      <p className="text-sm text-slate-600">
        Narrow, separate peaks mean a clear difference; overlapping curves mean it is too early to tell.
      </p>
    </figure>
  );
}

export interface HistoryPoint {
  t: number;
  /** variant key -> value */
  [key: string]: number;
}

export function HistoryChart(props: { title: string; points: HistoryPoint[]; variants: VariantInsight[]; note: string }) {
  return (
    <figure aria-label={props.title}>
      <figcaption className="mb-2 font-semibold">{props.title}</figcaption>
      <div className="h-56" aria-hidden="true">
        {props.points.length < 2 ? (
          <p className="p-4 text-sm text-slate-600">Collecting points: the server records them at a fixed interval, this page at every refresh…</p>
        ) : (
          <ResponsiveContainer width="100%" height="100%">
            <LineChart data={props.points} margin={{ top: 8, right: 8, bottom: 8, left: 8 }}>
              <CartesianGrid strokeDasharray="3 3" vertical={false} />
              <XAxis
                dataKey="t"
                type="number"
                domain={["dataMin", "dataMax"]}
                tickFormatter={(t: number) => new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" })}
              />
              <YAxis domain={[0, 1]} tickFormatter={pctTick} width={44} />
              <Tooltip labelFormatter={(t) => new Date(Number(t)).toLocaleTimeString()} formatter={(v) => pct(Number(v))} />
              <Legend />
              {props.variants.map((v, i) => (
                <Line
                  key={v.variantKey}
                  dataKey={v.variantKey}
                  name={v.variant}
                  dot={false}
                  isAnimationActive={false}
                  stroke={SERIES_COLOURS[i % SERIES_COLOURS.length]}
                  strokeDasharray={SERIES_DASHES[i % SERIES_DASHES.length]}
                  strokeWidth={2}
                />
              ))}
            </LineChart>
          </ResponsiveContainer>
        )}
      </div>
      <p className="text-sm text-slate-600">{props.note}</p>
    </figure>
  );
}
