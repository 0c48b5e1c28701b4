import { useEffect, useState, type ReactNode } from "react";
import { Link, useNavigate, useParams } from "react-router";
import { lifecycle } from "../clients";
import { ErrorBanner, Loading } from "../components/Feedback";
import { plainError, type FieldViolation } from "../errors";
import {
  draftFrom,
  emptyDraft,
  emptyVariant,
  parseConfig,
  toExperiment,
  uid,
  type Draft,
  type VariantDraft,
} from "../experimentDraft";
import { AllocationStrategy, ExperimentStatus, RewardDefinition } from "../gen/sira/experiments/v1/experiment_pb";
import { may } from "../rbac";

/** Field paths as the server names them in BadRequest (without the "experiment." prefix). */
type Errors = Record<string, string[]>;

const inputId = (path: string) => `f-${path.replace(/[^a-zA-Z0-9]+/g, "-")}`;

/** The form field a violation belongs to: its path, or the nearest enclosing path that has
 * a field ("variants[1].config.color" -> "variants[1].config"); null when none has. */
function fieldOf(path: string): string | null {
  const grouped = ["variants", "targeting.attributes", "allocation"];
  let p = path;
  for (;;) {
    if (document.getElementById(inputId(p)) !== null || grouped.includes(p)) return p;
    const parent = p.replace(/(\.[^.[\]]*|\[[^\]]*\])$/, "");
    if (parent === p || parent === "") return null;
    p = parent;
  }
}

/** Violations by the field they are shown under (the path is kept when it is nested). */
function byField(violations: FieldViolation[]): { placed: Errors; unplaced: FieldViolation[] } {
  const placed: Errors = {};
  const unplaced: FieldViolation[] = [];
  for (const v of violations) {
    const path = v.field.replace(/^experiment\./, "");
    const field = fieldOf(path);
    if (field === null) unplaced.push(v);
    else (placed[field] ??= []).push(field === path ? v.description : `${path.slice(field.length).replace(/^\./, "")}: ${v.description}`);
  }
  return { placed, unplaced };
}

function Field(props: { path: string; label: string; hint?: string; errors: Errors; children: (a: Record<string, unknown>) => ReactNode }) {
  const id = inputId(props.path);
  const problems = props.errors[props.path] ?? [];
  const described = [props.hint ? `${id}-hint` : "", problems.length ? `${id}-error` : ""].filter(Boolean).join(" ");
  return (
    <div data-field={props.path}>
      <label htmlFor={id} className="field-label">
        {props.label}
      </label>
      {props.children({ id, "aria-invalid": problems.length > 0, "aria-describedby": described || undefined })}
      {props.hint && (
        <p id={`${id}-hint`} className="mt-1 text-xs text-slate-600">
          {props.hint}
        </p>
      )}
      {problems.length > 0 && (
        <p id={`${id}-error`} className="field-error" data-error-for={props.path}>
          <span aria-hidden="true">⚠ </span>
          {problems.join("; ")}
        </p>
      )}
    </div>
  );
}

export function ExperimentForm() {
  const { ref } = useParams();
  const editing = ref !== undefined;
  const navigate = useNavigate();
  const [draft, setDraft] = useState<Draft | null>(editing ? null : emptyDraft());
  const [id, setId] = useState("");
  const [loadError, setLoadError] = useState<string | null>(null);
  const [serverErrors, setServerErrors] = useState<Errors>({});
  const [banner, setBanner] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  useEffect(() => {
    if (!editing) return;
    lifecycle
      .getExperiment({ experiment: ref })
      .then((r) => {
        const e = r.experiment!;
        if (e.status !== ExperimentStatus.DRAFT) {
          setLoadError("Only draft experiments can be edited.");
          return;
        }
        setId(e.id);
        setDraft(draftFrom(e));
      })
      .catch((err: unknown) => setLoadError(plainError(err).message));
  }, [editing, ref]);

  if (loadError) return <ErrorBanner message={loadError} />;
  if (!draft) return <Loading what="the experiment" />;

  const set = (patch: Partial<Draft>) => setDraft({ ...draft, ...patch });
  const setVariant = (i: number, patch: Partial<VariantDraft>) =>
    set({ variants: draft.variants.map((v, j) => (j === i ? { ...v, ...patch } : patch.isControl ? { ...v, isControl: false } : v)) });

  // Client-side checks the API types need before sending (the server validates the rest).
  const localErrors: Errors = {};
  draft.variants.forEach((v, i) => {
    const { error } = parseConfig(v.config);
    if (error) localErrors[`variants[${i}].config`] = [error];
  });
  if (draft.minTxn.trim() !== "" && !/^\d+$/.test(draft.minTxn.trim()))
    localErrors["targeting.min_txn"] = ["Enter a whole number of transactions (0 or more)."];
  if (draft.failFastMinSamples.trim() !== "" && !/^\d+$/.test(draft.failFastMinSamples.trim()))
    localErrors["fail_fast.min_samples"] = ["Enter a whole number."];
  const errors: Errors = { ...serverErrors };
  for (const [k, v] of Object.entries(localErrors)) errors[k] = [...(errors[k] ?? []), ...v];
  const fixed = draft.allocation === AllocationStrategy.FIXED_WEIGHTS;

  const submit = async (e: React.FormEvent) => {
    e.preventDefault();
    if (Object.keys(localErrors).length > 0) {
      setBanner("Fix the highlighted fields first.");
      return;
    }
    setBusy(true);
    setBanner(null);
    setServerErrors({});
    try {
      const experiment = toExperiment(draft, id);
      const saved = editing
        ? (await lifecycle.updateExperiment({ experiment })).experiment!
        : (await lifecycle.createExperiment({ experiment })).experiment!;
      navigate(`/experiments/${saved.key}`);
    } catch (err) {
      const plain = plainError(err);
      const { placed, unplaced } = byField(plain.violations);
      setServerErrors(placed);
      setBanner(plain.message + unplaced.map((v) => ` ${v.field}: ${v.description}.`).join(""));
      // Move keyboard focus to the first offending field.
      const first = Object.keys(placed).map((p) => document.getElementById(inputId(p))).find(Boolean);
      window.setTimeout(() => first?.focus(), 0);
    } finally {
      setBusy(false);
    }
  };

  if (!may(editing ? "UpdateExperiment" : "CreateExperiment"))
    return <ErrorBanner message="Your role may read experiments but not create or edit them." />;

  return (
    <form onSubmit={submit} noValidate className="space-y-6" aria-labelledby="form-title">
      <div className="flex flex-wrap items-center justify-between gap-2">
        <h1 id="form-title" className="text-2xl font-semibold">
          {editing ? `Edit draft “${draft.name}”` : "New experiment"}
        </h1>
        <Link to={editing ? `/experiments/${ref}` : "/"} className="text-blue-800 underline">
          Cancel
        </Link>
      </div>
      {banner && <ErrorBanner message={banner} />}

      <fieldset className="card grid gap-4 md:grid-cols-2">
        <legend className="px-1 font-semibold">About</legend>
        <Field path="name" label="Name" errors={errors}>
          {(a) => <input {...a} className="field-input" value={draft.name} onChange={(e) => set({ name: e.target.value })} required />}
        </Field>
        <Field path="key" label="Key" hint={editing ? "The key cannot change." : "Lower-case letters, digits, - and _. Left empty: derived from the name."} errors={errors}>
          {(a) => <input {...a} className="field-input font-mono" value={draft.key} readOnly={editing} onChange={(e) => set({ key: e.target.value })} />}
        </Field>
        <div className="md:col-span-2">
          <Field path="description" label="Description" errors={errors}>
            {(a) => <textarea {...a} rows={2} className="field-input" value={draft.description} onChange={(e) => set({ description: e.target.value })} />}
          </Field>
        </div>
      </fieldset>

      <fieldset className="card grid gap-4 md:grid-cols-2">
        <legend className="px-1 font-semibold">Who takes part (targeting)</legend>
        <Field path="targeting.countries" label="Countries" hint="ISO codes separated by commas, e.g. SN, FR. Empty: everyone." errors={errors}>
          {(a) => <input {...a} className="field-input" value={draft.countries} onChange={(e) => set({ countries: e.target.value })} />}
        </Field>
        <Field path="targeting.languages" label="Languages" hint="e.g. fr, en. Empty: everyone." errors={errors}>
          {(a) => <input {...a} className="field-input" value={draft.languages} onChange={(e) => set({ languages: e.target.value })} />}
        </Field>
        <Field path="targeting.devices" label="Devices" hint="e.g. mobile, desktop. Empty: everyone." errors={errors}>
          {(a) => <input {...a} className="field-input" value={draft.devices} onChange={(e) => set({ devices: e.target.value })} />}
        </Field>
        <Field path="targeting.user_segments" label="Segments" hint="e.g. premium. Empty: everyone." errors={errors}>
          {(a) => <input {...a} className="field-input" value={draft.segments} onChange={(e) => set({ segments: e.target.value })} />}
        </Field>
        <Field path="targeting.min_txn" label="Minimum past transactions" hint="Empty: no minimum." errors={errors}>
          {(a) => <input {...a} inputMode="numeric" className="field-input" value={draft.minTxn} onChange={(e) => set({ minTxn: e.target.value })} />}
        </Field>
        <Field path="exposure_percent" label="Exposure (% of eligible users who enter)" errors={errors}>
          {(a) => <input {...a} inputMode="decimal" className="field-input" value={draft.exposure} onChange={(e) => set({ exposure: e.target.value })} />}
        </Field>
        <div className="space-y-2 md:col-span-2" data-field="targeting.attributes">
          <p className="field-label">Other attributes (the user's value must be one of the listed values)</p>
          {draft.attributes.map((attr, i) => (
            <div key={attr.uid} className="flex flex-wrap items-end gap-2">
              <div className="flex-1">
                <Field path={`targeting.attributes.${attr.name || i}`} label={`Attribute ${i + 1} name`} errors={errors}>
                  {(a) => (
                    <input {...a} className="field-input" value={attr.name}
                      onChange={(e) => set({ attributes: draft.attributes.map((x, j) => (j === i ? { ...x, name: e.target.value } : x)) })} />
                  )}
                </Field>
              </div>
              <div className="flex-[2]">
                <Field path={`targeting.attributes.${attr.name || i}.values`} label={`Attribute ${i + 1} values (comma separated)`} errors={errors}>
                  {(a) => (
                    <input {...a} className="field-input" value={attr.values}
                      onChange={(e) => set({ attributes: draft.attributes.map((x, j) => (j === i ? { ...x, values: e.target.value } : x)) })} />
                  )}
                </Field>
              </div>
              <button type="button" className="btn-secondary" onClick={() => set({ attributes: draft.attributes.filter((_, j) => j !== i) })}>
                Remove attribute {i + 1}
              </button>
            </div>
          ))}
          <button type="button" className="btn-secondary" onClick={() => set({ attributes: [...draft.attributes, { uid: uid(), name: "", values: "" }] })}>
            + Add attribute
          </button>
          {errors["targeting.attributes"] && <p className="field-error">{errors["targeting.attributes"].join("; ")}</p>}
        </div>
      </fieldset>

      <fieldset className="card grid gap-4 md:grid-cols-2">
        <legend className="px-1 font-semibold">Allocation and outcome</legend>
        <fieldset data-field="allocation">
          <legend className="field-label">How users are split</legend>
          <label className="mt-1 flex items-center gap-2">
            <input type="radio" name="allocation" checked={!fixed} onChange={() => set({ allocation: AllocationStrategy.THOMPSON_SAMPLING })} />
            Learn as it goes (bandit: more users to the better variants)
          </label>
          <label className="flex items-center gap-2">
            <input type="radio" name="allocation" checked={fixed} onChange={() => set({ allocation: AllocationStrategy.FIXED_WEIGHTS })} />
            Fixed weights
          </label>
          {errors["allocation"] && <p className="field-error">{errors["allocation"].join("; ")}</p>}
        </fieldset>
        <Field path="reward" label="Success means" errors={errors}>
          {(a) => (
            <select {...a} className="field-input" value={draft.reward} onChange={(e) => set({ reward: Number(e.target.value) as RewardDefinition })}>
              <option value={RewardDefinition.CONVERSION}>At least one conversion</option>
              <option value={RewardDefinition.CONVERSION_NOT_REFUNDED}>A conversion that was not refunded</option>
            </select>
          )}
        </Field>
        <Field path="primary_metric" label="Primary metric (event type)" errors={errors}>
          {(a) => <input {...a} className="field-input font-mono" value={draft.primaryMetric} onChange={(e) => set({ primaryMetric: e.target.value })} />}
        </Field>
      </fieldset>

      <fieldset className="card grid gap-4 md:grid-cols-3">
        <legend className="px-1 font-semibold">Fail-fast (stop losing variants early)</legend>
        <label className="flex items-center gap-2 md:col-span-3">
          <input type="checkbox" checked={draft.autoStop} onChange={(e) => set({ autoStop: e.target.checked })} />
          Act on it automatically: drop failing variants and stop the experiment when it is decided
        </label>
        <Field path="fail_fast.min_samples" label="Minimum users per variant" errors={errors}>
          {(a) => <input {...a} inputMode="numeric" className="field-input" value={draft.failFastMinSamples} onChange={(e) => set({ failFastMinSamples: e.target.value })} />}
        </Field>
        <Field path="fail_fast.error_rate" label="Error rate (0–0.5)" hint="Chance of ever deciding wrongly." errors={errors}>
          {(a) => <input {...a} inputMode="decimal" className="field-input" value={draft.failFastErrorRate} onChange={(e) => set({ failFastErrorRate: e.target.value })} />}
        </Field>
        <Field path="fail_fast.min_effect" label="Smallest difference to detect (0–1)" errors={errors}>
          {(a) => <input {...a} inputMode="decimal" className="field-input" value={draft.failFastMinEffect} onChange={(e) => set({ failFastMinEffect: e.target.value })} />}
        </Field>
        <Field path="fail_fast.threshold" label="Guardrail threshold (0.5–1)" hint="Flags refund or churn worse than the best with this probability." errors={errors}>
          {(a) => <input {...a} inputMode="decimal" className="field-input" value={draft.failFastThreshold} onChange={(e) => set({ failFastThreshold: e.target.value })} />}
        </Field>
      </fieldset>

      <fieldset className="card space-y-4" data-field="variants">
        <legend className="px-1 font-semibold">Variants (2 to 20)</legend>
        {errors["variants"] && <p className="field-error">{errors["variants"].join("; ")}</p>}
        {draft.variants.map((v, i) => (
          <fieldset key={v.uid} className="grid gap-3 rounded border border-slate-300 p-3 md:grid-cols-2" aria-label={`Variant ${i + 1}`}>
            <legend className="px-1 text-sm font-semibold">Variant {i + 1}{v.isControl ? " (control)" : ""}</legend>
            <Field path={`variants[${i}].name`} label={`Variant ${i + 1} name`} errors={errors}>
              {(a) => <input {...a} className="field-input" value={v.name} onChange={(e) => setVariant(i, { name: e.target.value })} />}
            </Field>
            <Field path={`variants[${i}].key`} label={`Variant ${i + 1} key`} hint="Empty: derived from the name." errors={errors}>
              {(a) => <input {...a} className="field-input font-mono" value={v.key} onChange={(e) => setVariant(i, { key: e.target.value })} />}
            </Field>
            <label className="flex items-center gap-2" data-field={`variants[${i}].is_control`}>
              <input type="radio" name="control" checked={v.isControl} onChange={() => setVariant(i, { isControl: true })} />
              Variant {i + 1} is the control (the current experience)
            </label>
            {fixed && (
              <Field path={`variants[${i}].weight`} label={`Variant ${i + 1} weight`} errors={errors}>
                {(a) => <input {...a} inputMode="decimal" className="field-input" value={v.weight} onChange={(e) => setVariant(i, { weight: e.target.value })} />}
              </Field>
            )}
            <div className="md:col-span-2">
              <Field path={`variants[${i}].config`} label={`Variant ${i + 1} configuration (JSON object handed to your app)`} errors={errors}>
                {(a) => (
                  <textarea {...a} rows={3} spellCheck={false} className="field-input font-mono text-sm" value={v.config}
                    onChange={(e) => setVariant(i, { config: e.target.value })} />
                )}
              </Field>
            </div>
            {draft.variants.length > 2 && (
              <div>
                <button type="button" className="btn-secondary" onClick={() => set({ variants: draft.variants.filter((_, j) => j !== i) })}>
                  Remove variant {i + 1}
                </button>
              </div>
            )}
          </fieldset>
        ))}
        {draft.variants.length < 20 && (
          <button type="button" className="btn-secondary" onClick={() => set({ variants: [...draft.variants, emptyVariant()] })}>
            + Add variant
          </button>
        )}
      </fieldset>

      <div className="flex gap-2">
        <button type="submit" className="btn-primary" disabled={busy}>
          {busy ? "Saving…" : editing ? "Save draft" : "Create draft"}
        </button>
      </div>
    </form>
  );
}
