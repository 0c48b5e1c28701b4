import { InsightsService } from "./gen/sira/experiments/v1/insights_service_pb";
import { LifecycleService } from "./gen/sira/experiments/v1/lifecycle_service_pb";
import { client } from "./transport";

export const lifecycle = client(LifecycleService);
export const insights = client(InsightsService);
