import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { ExperimentStatus } from "./gen/sira/experiments/v1/experiment_pb";

export function pct(x: number, digits = 1): string {
  return `${(x * 100).toFixed(digits)} %`;
}

export function signedPct(x: number, digits = 1): string {
  const v = (x * 100).toFixed(digits);
  return `${x > 0 ? "+" : ""}${v} %`;
}

export function when(ts: Timestamp | undefined): string {
  if (!ts) return "—";
  return timestampDate(ts).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export const STATUS_WORDS: Record<ExperimentStatus, string> = {
  [ExperimentStatus.UNSPECIFIED]: "Unknown",
  [ExperimentStatus.DRAFT]: "Draft",
  [ExperimentStatus.RUNNING]: "Running",
  [ExperimentStatus.STOPPED]: "Stopped",
  [ExperimentStatus.ARCHIVED]: "Archived",
};

/** Colours for the variants' series, distinguishable for common colour blindness (Okabe–Ito). */
export const SERIES_COLOURS = ["#0072B2", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];
export const SERIES_DASHES = ["", "6 3", "2 2", "8 3 2 3", "1 3", "10 4", "4 4", "3 6"];
