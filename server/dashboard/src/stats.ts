// Posterior densities drawn in the browser: Beta(1 + conversions, 1 + samples - conversions),
// the posterior GetInsights documents for each variant's conversion_rate.

function logGamma(x: number): number {
  // Lanczos approximation (g = 7, n = 9), accurate to ~1e-15 for x > 0.
  const c = [
    0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
    -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6,
    1.5056327351493116e-7,
  ];
  if (x < 0.5) return Math.log(Math.PI / Math.sin(Math.PI * x)) - logGamma(1 - x);
  const z = x - 1;
  let a = c[0];
  const t = z + 7.5;
  for (let i = 1; i < 9; i++) a += c[i] / (z + i);
  return 0.5 * Math.log(2 * Math.PI) + (z + 0.5) * Math.log(t) - t + Math.log(a);
}

export function betaPdf(x: number, a: number, b: number): number {
  if (x <= 0 || x >= 1) return 0;
  const logB = logGamma(a) + logGamma(b) - logGamma(a + b);
  return Math.exp((a - 1) * Math.log(x) + (b - 1) * Math.log(1 - x) - logB);
}

export interface Posterior {
  key: string;
  a: number;
  b: number;
}

/** Points over the range where the posteriors have their mass (mean ± 5 sd, clipped to [0, 1]). */
export function densityCurves(posteriors: Posterior[], points = 120): Record<string, number>[] {
  if (posteriors.length === 0) return [];
  let lo = 1;
  let hi = 0;
  for (const { a, b } of posteriors) {
    const mean = a / (a + b);
    const sd = Math.sqrt((a * b) / ((a + b) ** 2 * (a + b + 1)));
    lo = Math.min(lo, mean - 5 * sd);
    hi = Math.max(hi, mean + 5 * sd);
  }
  lo = Math.max(0, lo);
  hi = Math.min(1, hi);
  const rows: Record<string, number>[] = [];
  for (let i = 0; i <= points; i++) {
    const x = lo + ((hi - lo) * i) / points;
    const row: Record<string, number> = { x };
    for (const p of posteriors) row[p.key] = betaPdf(x, p.a, p.b);
    rows.push(row);
  }
  return rows;
}
