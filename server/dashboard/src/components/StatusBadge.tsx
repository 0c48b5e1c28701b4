import { ExperimentStatus } from "../gen/sira/experiments/v1/experiment_pb";
import { STATUS_WORDS } from "../format";

// Word + symbol + colour: the colour is never the only carrier of the status.
const STYLE: Record<ExperimentStatus, { cls: string; icon: string }> = {
  [ExperimentStatus.UNSPECIFIED]: { cls: "bg-slate-100 text-slate-700 ring-slate-300", icon: "?" },
  [ExperimentStatus.DRAFT]: { cls: "bg-amber-50 text-amber-900 ring-amber-300", icon: "✎" },
  [ExperimentStatus.RUNNING]: { cls: "bg-emerald-50 text-emerald-900 ring-emerald-400", icon: "▶" },
  [ExperimentStatus.STOPPED]: { cls: "bg-slate-100 text-slate-800 ring-slate-400", icon: "■" },
  [ExperimentStatus.ARCHIVED]: { cls: "bg-slate-50 text-slate-600 ring-slate-300", icon: "▣" },
};

export function StatusBadge({ status }: { status: ExperimentStatus }) {
  const { cls, icon } = STYLE[status];
  return (
    <span
      className={`inline-flex items-center gap-1 rounded-full px-2 py-0.5 text-xs font-medium ring-1 ring-inset ${cls}`}
      data-status={STATUS_WORDS[status].toLowerCase()}
    >
      <span aria-hidden="true">{icon}</span>
      {STATUS_WORDS[status]}
    </span>
  );
}
