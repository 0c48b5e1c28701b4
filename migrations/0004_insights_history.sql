-- Allocation and P(best) over time (issue 12): one row per variant per recorded
-- point, written by the background insights round of one replica (the autopilot's
-- advisory lock); recorded_at is truncated to SIRA_INSIGHTS_HISTORY_SECONDS, so a
-- second replica writing the same point conflicts and writes nothing.
CREATE TABLE insights_history (
    experiment_id uuid NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    recorded_at timestamptz NOT NULL,
    variant_id uuid NOT NULL,
    trials bigint NOT NULL CHECK (trials >= 0),
    successes bigint NOT NULL CHECK (successes >= 0),
    p_best double precision NOT NULL CHECK (p_best >= 0 AND p_best <= 1),
    allocation double precision NOT NULL CHECK (allocation >= 0 AND allocation <= 1),
    PRIMARY KEY (experiment_id, recorded_at, variant_id)
);

-- The default privileges of 0003 already give sira_app every row right on a new
-- table; the server only appends, reads and prunes points, so no UPDATE.
REVOKE UPDATE ON insights_history FROM sira_app;
GRANT SELECT, INSERT, DELETE ON insights_history TO sira_app;
