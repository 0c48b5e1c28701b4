export function Loading({ what }: { what: string }) {
  return (
    <p role="status" className="flex items-center gap-2 p-4 text-slate-600">
      <span className="inline-block h-4 w-4 animate-spin rounded-full border-2 border-slate-300 border-t-slate-700" aria-hidden="true" />
      Loading {what}…
    </p>
  );
}

export function ErrorBanner({ message, onRetry }: { message: string; onRetry?: () => void }) {
  return (
    <div role="alert" className="my-3 flex flex-wrap items-center gap-3 rounded border border-red-300 bg-red-50 p-3 text-red-900">
      <span aria-hidden="true" className="font-bold">!</span>
      <span className="flex-1">{message}</span>
      {onRetry && (
        <button type="button" className="btn-secondary" onClick={onRetry}>
          Try again
        </button>
      )}
    </div>
  );
}
