import type { AuditEvent } from "../gen/sira/experiments/v1/lifecycle_service_pb";
import { when } from "../format";

export function AuditTrail({ events }: { events: AuditEvent[] | null }) {
  return (
    <section aria-labelledby="audit-title" className="card">
      <h2 id="audit-title" className="mb-2 font-semibold">
        Audit trail
      </h2>
      {events === null ? (
        <p className="text-slate-600">Loading…</p>
      ) : events.length === 0 ? (
        <p className="text-slate-600">No events.</p>
      ) : (
        <ol className="divide-y divide-slate-200" data-testid="audit-trail">
          {events.map((e) => (
            <li key={e.id.toString()} className="py-2" data-action={e.action}>
              <div className="flex flex-wrap gap-x-3">
                <strong>{e.action}</strong>
                <span>by {e.actor}</span>
                <time className="text-slate-600">{when(e.createTime)}</time>
              </div>
              {e.details && Object.keys(e.details).length > 0 && (
                <details className="text-sm">
                  <summary className="cursor-pointer text-blue-800">Details</summary>
                  <pre className="overflow-x-auto whitespace-pre-wrap break-all bg-slate-50 p-2 text-xs">{JSON.stringify(e.details, null, 2)}</pre>
                </details>
              )}
            </li>
          ))}
        </ol>
      )}
    </section>
  );
}
