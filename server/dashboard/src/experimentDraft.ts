// The form's editable copy of an experiment, and its conversion to and from the API message.
import { create, type JsonObject } from "@bufbuild/protobuf";
import {
  AllocationStrategy,
  ExperimentSchema,
  RewardDefinition,
  type Experiment,
} from "./gen/sira/experiments/v1/experiment_pb";

export interface VariantDraft {
  /** Stable React key (not sent). */
  uid: string;
  name: string;
  key: string;
  isControl: boolean;
  weight: string;
  config: string;
}

export interface AttributeDraft {
  uid: string;
  name: string;
  values: string;
}

export interface Draft {
  name: string;
  key: string;
  description: string;
  countries: string;
  languages: string;
  devices: string;
  segments: string;
  minTxn: string;
  attributes: AttributeDraft[];
  exposure: string;
  allocation: AllocationStrategy;
  primaryMetric: string;
  reward: RewardDefinition;
  failFastThreshold: string;
  failFastMinSamples: string;
  failFastErrorRate: string;
  failFastMinEffect: string;
  autoStop: boolean;
  variants: VariantDraft[];
}

let counter = 0;
export const uid = () => `u${++counter}`;

export function emptyVariant(name = "", isControl = false): VariantDraft {
  return { uid: uid(), name, key: "", isControl, weight: "1", config: "{}" };
}

export function emptyDraft(): Draft {
  return {
    name: "",
    key: "",
    description: "",
    countries: "",
    languages: "",
    devices: "",
    segments: "",
    minTxn: "",
    attributes: [],
    exposure: "100",
    allocation: AllocationStrategy.THOMPSON_SAMPLING,
    primaryMetric: "conversion",
    reward: RewardDefinition.CONVERSION,
    failFastThreshold: "0.95",
    failFastMinSamples: "100",
    failFastErrorRate: "0.05",
    failFastMinEffect: "0.02",
    autoStop: false,
    variants: [emptyVariant("Control", true), emptyVariant()],
  };
}

export function draftFrom(e: Experiment): Draft {
  const t = e.targeting;
  const ff = e.failFast;
  return {
    name: e.name,
    key: e.key,
    description: e.description,
    countries: t?.countries.join(", ") ?? "",
    languages: t?.languages.join(", ") ?? "",
    devices: t?.devices.join(", ") ?? "",
    segments: t?.userSegments.join(", ") ?? "",
    minTxn: t?.minTxn !== undefined ? String(t.minTxn) : "",
    attributes: Object.entries(t?.attributes ?? {}).map(([name, v]) => ({ uid: uid(), name, values: v.values.join(", ") })),
    exposure: String(e.exposurePercent ?? 100),
    allocation: e.allocation,
    primaryMetric: e.primaryMetric,
    reward: e.reward,
    failFastThreshold: String(ff?.threshold ?? 0.95),
    failFastMinSamples: String(ff?.minSamples ?? 100),
    failFastErrorRate: String(ff?.errorRate ?? 0.05),
    failFastMinEffect: String(ff?.minEffect ?? 0.02),
    autoStop: ff?.autoStop ?? false,
    variants: e.variants.map((v) => ({
      uid: uid(),
      name: v.name,
      key: v.key,
      isControl: v.isControl,
      weight: String(v.weight || 1),
      config: JSON.stringify(v.config ?? {}, null, 2),
    })),
  };
}

const list = (s: string) =>
  s
    .split(",")
    .map((x) => x.trim())
    .filter(Boolean);

/** A number field: blank means "the server's default"; anything else is sent as typed
 * (NaN for non-numbers, which the server rejects with a field violation). */
const num = (s: string): number | undefined => (s.trim() === "" ? undefined : Number(s));

/** Parses a variant's JSON config; returns an error sentence when it is not a JSON object. */
export function parseConfig(text: string): { value?: JsonObject; error?: string } {
  if (text.trim() === "") return { value: {} };
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      return { error: "The configuration must be a JSON object, like {\"button_color\": \"#34C759\"}." };
    }
    return { value: value as JsonObject };
  } catch (err) {
    return { error: `Not valid JSON: ${err instanceof Error ? err.message : String(err)}` };
  }
}

export function toExperiment(d: Draft, id = ""): Experiment {
  const minTxn = d.minTxn.trim();
  return create(ExperimentSchema, {
    id,
    name: d.name,
    key: d.key.trim(),
    description: d.description,
    targeting: {
      countries: list(d.countries).map((c) => c.toUpperCase()),
      languages: list(d.languages).map((c) => c.toLowerCase()),
      devices: list(d.devices),
      userSegments: list(d.segments),
      minTxn: minTxn === "" ? undefined : /^-?\d+$/.test(minTxn) ? BigInt(minTxn) : undefined,
      attributes: Object.fromEntries(
        d.attributes.filter((a) => a.name.trim() !== "").map((a) => [a.name.trim(), { values: list(a.values) }]),
      ),
    },
    allocation: d.allocation,
    exposurePercent: num(d.exposure),
    primaryMetric: d.primaryMetric.trim(),
    reward: d.reward,
    failFast: {
      threshold: num(d.failFastThreshold),
      minSamples: /^\d+$/.test(d.failFastMinSamples.trim()) ? BigInt(d.failFastMinSamples.trim()) : undefined,
      errorRate: num(d.failFastErrorRate),
      minEffect: num(d.failFastMinEffect),
      autoStop: d.autoStop,
    },
    variants: d.variants.map((v) => ({
      name: v.name,
      key: v.key.trim(),
      isControl: v.isControl,
      weight: num(v.weight) ?? 1,
      config: parseConfig(v.config).value ?? {},
    })),
  });
}
