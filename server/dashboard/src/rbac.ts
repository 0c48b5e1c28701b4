// Who may call which RPC, copied from server/sira_server/rbac.py (tests/test_dashboard_bundle.py
// fails when the two differ). Used only to hide what the role may not do: the server
// still enforces every call.
import { currentSession } from "./auth";

export const METHOD_ROLES: Record<string, readonly string[]> = {
  "/sira.experiments.v1.LifecycleService/CreateExperiment": ["marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/UpdateExperiment": ["marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/StartExperiment": ["marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/StopExperiment": ["marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/ArchiveExperiment": ["marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/DeleteExperiment": ["ops_admin"],
  "/sira.experiments.v1.LifecycleService/ArchiveStaleExperiments": ["ops_admin"],
  "/sira.experiments.v1.LifecycleService/GetExperiment": ["data_science", "marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/ListExperiments": ["data_science", "marketing", "ops_admin"],
  "/sira.experiments.v1.LifecycleService/ListAuditEvents": ["data_science", "marketing", "ops_admin"],
  "/sira.experiments.v1.InsightsService/GetResults": ["data_science", "marketing", "ops_admin"],
  "/sira.experiments.v1.InsightsService/GetInsights": ["data_science", "marketing", "ops_admin"],
  "/sira.experiments.v1.InsightsService/GetInsightsHistory": ["data_science", "marketing", "ops_admin"],
};

export type LifecycleAction =
  | "CreateExperiment"
  | "UpdateExperiment"
  | "StartExperiment"
  | "StopExperiment"
  | "ArchiveExperiment"
  | "DeleteExperiment";

export function may(action: LifecycleAction, roles?: readonly string[]): boolean {
  const held = roles ?? currentSession()?.roles ?? [];
  const allowed = METHOD_ROLES[`/sira.experiments.v1.LifecycleService/${action}`] ?? [];
  return held.some((role) => allowed.includes(role));
}
