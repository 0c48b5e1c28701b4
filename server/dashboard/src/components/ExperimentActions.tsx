import { useId, useState } from "react";
import { Link, useNavigate } from "react-router";
import { lifecycle } from "../clients";
import { plainError } from "../errors";
import { ExperimentStatus, type Experiment } from "../gen/sira/experiments/v1/experiment_pb";
import { may } from "../rbac";
import { ConfirmDialog } from "./ConfirmDialog";

type Pending = "start" | "stop" | "archive" | "delete" | null;

// Start / stop / archive / delete, each behind a confirmation; only the ones the status and
// the signed-in role allow are shown.
export function ExperimentActions({ experiment, onChanged }: { experiment: Experiment; onChanged: () => void }) {
  const navigate = useNavigate();
  const [pending, setPending] = useState<Pending>(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [winner, setWinner] = useState("");
  const [reason, setReason] = useState("");
  const winnerId = useId();
  const reasonId = useId();
  const s = experiment.status;
  const ref = experiment.id;

  const open = (p: Pending) => {
    setError(null);
    setPending(p);
  };
  const run = async () => {
    setBusy(true);
    setError(null);
    try {
      if (pending === "start") await lifecycle.startExperiment({ experiment: ref });
      if (pending === "stop") await lifecycle.stopExperiment({ experiment: ref, winnerVariant: winner, reason });
      if (pending === "archive") await lifecycle.archiveExperiment({ experiment: ref });
      if (pending === "delete") {
        await lifecycle.deleteExperiment({ experiment: ref });
        navigate("/");
        return;
      }
      setPending(null);
      onChanged();
    } catch (err) {
      setError(plainError(err).message);
    } finally {
      setBusy(false);
    }
  };

  const canEdit = s === ExperimentStatus.DRAFT && may("UpdateExperiment");
  const canStart = s === ExperimentStatus.DRAFT && may("StartExperiment");
  const canStop = s === ExperimentStatus.RUNNING && may("StopExperiment");
  const canArchive = s === ExperimentStatus.STOPPED && may("ArchiveExperiment");
  const canDelete = (s === ExperimentStatus.DRAFT || s === ExperimentStatus.STOPPED) && may("DeleteExperiment");
  if (!(canEdit || canStart || canStop || canArchive || canDelete)) return null;

  return (
    <div className="flex flex-wrap gap-2" role="group" aria-label="Actions">
      {canEdit && (
        <Link to={`/experiments/${experiment.key}/edit`} className="btn-secondary">
          ✎ Edit draft
        </Link>
      )}
      {canStart && (
        <button type="button" className="btn-primary" onClick={() => open("start")}>
          ▶ Start
        </button>
      )}
      {canStop && (
        <button type="button" className="btn-danger" onClick={() => open("stop")}>
          ■ Stop
        </button>
      )}
      {canArchive && (
        <button type="button" className="btn-secondary" onClick={() => open("archive")}>
          ▣ Archive
        </button>
      )}
      {canDelete && (
        <button type="button" className="btn-danger" onClick={() => open("delete")}>
          ✕ Delete
        </button>
      )}

      <ConfirmDialog open={pending === "start"} title={`Start “${experiment.name}”?`} confirmLabel="Start" busy={busy} error={error} onConfirm={run} onCancel={() => setPending(null)}>
        <p>Users will start receiving its variants. Its settings cannot be edited afterwards.</p>
      </ConfirmDialog>
      <ConfirmDialog open={pending === "stop"} title={`Stop “${experiment.name}”?`} confirmLabel="Stop the experiment" danger busy={busy} error={error} onConfirm={run} onCancel={() => setPending(null)}>
        <div>
          <label htmlFor={winnerId} className="field-label">
            Winner (served to everyone from now on)
          </label>
          <select id={winnerId} className="field-input" value={winner} onChange={(e) => setWinner(e.target.value)}>
            <option value="">No winner: everyone gets the control</option>
            {experiment.variants.map((v) => (
              <option key={v.id} value={v.key}>
                {v.name}
                {v.isControl ? " (control)" : ""}
              </option>
            ))}
          </select>
        </div>
        <div>
          <label htmlFor={reasonId} className="field-label">
            Reason (kept in the audit trail)
          </label>
          <textarea id={reasonId} className="field-input" rows={2} value={reason} onChange={(e) => setReason(e.target.value)} />
        </div>
      </ConfirmDialog>
      <ConfirmDialog open={pending === "archive"} title={`Archive “${experiment.name}”?`} confirmLabel="Archive" busy={busy} error={error} onConfirm={run} onCancel={() => setPending(null)}>
        <p>It leaves the active lists; its results and audit trail are kept.</p>
      </ConfirmDialog>
      <ConfirmDialog open={pending === "delete"} title={`Delete “${experiment.name}”?`} confirmLabel="Delete for good" danger busy={busy} error={error} onConfirm={run} onCancel={() => setPending(null)}>
        <p>This cannot be undone.</p>
      </ConfirmDialog>
    </div>
  );
}
