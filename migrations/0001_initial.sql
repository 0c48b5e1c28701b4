-- SIRA schema: the seed's six tables, with the rules made true by constraints.
-- Applied by `sira migrate` inside one transaction.

CREATE TABLE experiments (
    id                    uuid PRIMARY KEY,
    key                   text NOT NULL UNIQUE
                          CHECK (key ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name                  text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    description           text NOT NULL DEFAULT '',
    status                text NOT NULL DEFAULT 'draft'
                          CHECK (status IN ('draft', 'running', 'stopped', 'archived')),
    targeting             jsonb NOT NULL DEFAULT '{}'::jsonb
                          CHECK (jsonb_typeof(targeting) = 'object'),
    allocation            text NOT NULL DEFAULT 'thompson_sampling'
                          CHECK (allocation IN ('thompson_sampling', 'fixed_weights')),
    exposure_percent      double precision NOT NULL DEFAULT 100
                          CHECK (exposure_percent > 0 AND exposure_percent <= 100),
    primary_metric        text NOT NULL DEFAULT 'conversion',
    fail_fast_threshold   double precision NOT NULL DEFAULT 0.95
                          CHECK (fail_fast_threshold > 0.5 AND fail_fast_threshold < 1),
    fail_fast_min_samples bigint NOT NULL DEFAULT 100 CHECK (fail_fast_min_samples >= 1),
    auto_stop             boolean NOT NULL DEFAULT false,
    reward                text NOT NULL DEFAULT 'conversion'
                          CHECK (reward IN ('conversion', 'conversion_not_refunded')),
    created_by            text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    started_at            timestamptz,
    stopped_at            timestamptz,
    archived_at           timestamptz,
    winner_variant_id     uuid,
    stop_reason           text NOT NULL DEFAULT '',
    version               bigint NOT NULL DEFAULT 1,
    -- A running experiment has started; a stopped or archived one has stopped.
    CHECK (status = 'draft' OR started_at IS NOT NULL),
    CHECK (status NOT IN ('stopped', 'archived') OR stopped_at IS NOT NULL),
    CHECK (winner_variant_id IS NULL OR status IN ('stopped', 'archived'))
);

CREATE TABLE experiment_variants (
    id            uuid PRIMARY KEY,
    experiment_id uuid NOT NULL REFERENCES experiments (id) ON DELETE CASCADE,
    key           text NOT NULL CHECK (key ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name          text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    config        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(config) = 'object'),
    is_control    boolean NOT NULL DEFAULT false,
    weight        double precision NOT NULL DEFAULT 1
                  CHECK (weight > 0 AND weight < 'Infinity'::double precision),
    position      integer NOT NULL,
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'dropped')),
    dropped_at    timestamptz,
    UNIQUE (experiment_id, key),
    UNIQUE (experiment_id, position),
    -- Target of composite foreign keys: a row naming a variant also names
    -- its experiment, and the two must agree.
    UNIQUE (experiment_id, id),
    CHECK ((state = 'dropped') = (dropped_at IS NOT NULL))
);

-- At most one control per experiment.
CREATE UNIQUE INDEX experiment_variants_one_control
    ON experiment_variants (experiment_id) WHERE is_control;

-- The winner is one of the experiment's own variants.
ALTER TABLE experiments
    ADD CONSTRAINT experiments_winner_fk
    FOREIGN KEY (id, winner_variant_id) REFERENCES experiment_variants (experiment_id, id)
    DEFERRABLE INITIALLY DEFERRED;

-- Sticky assignments: one row per (experiment, subject), forever.
CREATE TABLE experiment_assignments (
    experiment_id uuid NOT NULL,
    molam_id      text NOT NULL CHECK (length(molam_id) BETWEEN 1 AND 256),
    variant_id    uuid NOT NULL,
    propensity    double precision NOT NULL CHECK (propensity > 0 AND propensity <= 1),
    context       jsonb NOT NULL DEFAULT '{}'::jsonb,
    assigned_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (experiment_id, molam_id),
    UNIQUE (experiment_id, molam_id, variant_id),
    FOREIGN KEY (experiment_id, variant_id)
        REFERENCES experiment_variants (experiment_id, id) ON DELETE CASCADE
);
CREATE INDEX experiment_assignments_variant_idx ON experiment_assignments (variant_id);
CREATE INDEX experiment_assignments_molam_idx ON experiment_assignments (molam_id);

-- Tracked events; the event id makes ingest idempotent.
CREATE TABLE experiment_metrics (
    experiment_id uuid NOT NULL,
    event_id      text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 128),
    variant_id    uuid NOT NULL,
    molam_id      text NOT NULL,
    event_type    text NOT NULL CHECK (event_type ~ '^[a-z][a-z0-9_-]{0,63}$'),
    value         double precision NOT NULL DEFAULT 0
                  CHECK (value >= 0 AND value < 'Infinity'::double precision),
    currency      text CHECK (currency ~ '^[A-Z]{3}$'),
    occurred_at   timestamptz NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (experiment_id, event_id),
    -- Only a subject assigned to that very variant can have events.
    FOREIGN KEY (experiment_id, molam_id, variant_id)
        REFERENCES experiment_assignments (experiment_id, molam_id, variant_id)
        ON DELETE CASCADE
);
CREATE INDEX experiment_metrics_variant_idx ON experiment_metrics (variant_id);
CREATE INDEX experiment_metrics_molam_idx ON experiment_metrics (molam_id);
CREATE INDEX experiment_metrics_event_type_idx ON experiment_metrics (experiment_id, event_type);

-- Immutable audit trail. No foreign key: it outlives deleted experiments.
CREATE TABLE experiment_audit_logs (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    experiment_id uuid,
    actor         text NOT NULL CHECK (length(actor) >= 1),
    action        text NOT NULL CHECK (length(action) >= 1),
    details       jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(details) = 'object'),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX experiment_audit_logs_experiment_idx
    ON experiment_audit_logs (experiment_id, id DESC);

CREATE FUNCTION experiment_audit_logs_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'experiment_audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER experiment_audit_logs_no_update_delete
    BEFORE UPDATE OR DELETE ON experiment_audit_logs
    FOR EACH ROW EXECUTE FUNCTION experiment_audit_logs_immutable();
CREATE TRIGGER experiment_audit_logs_no_truncate
    BEFORE TRUNCATE ON experiment_audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION experiment_audit_logs_immutable();

-- Snapshot of the hot bandit counters (Redis is the live copy).
CREATE TABLE experiment_bandit_state (
    experiment_id uuid NOT NULL,
    variant_id    uuid NOT NULL,
    alpha         double precision NOT NULL DEFAULT 1 CHECK (alpha >= 1),
    beta          double precision NOT NULL DEFAULT 1 CHECK (beta >= 1),
    total_samples bigint NOT NULL DEFAULT 0 CHECK (total_samples >= 0),
    successes     bigint NOT NULL DEFAULT 0 CHECK (successes >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (experiment_id, variant_id),
    FOREIGN KEY (experiment_id, variant_id)
        REFERENCES experiment_variants (experiment_id, id) ON DELETE CASCADE,
    CHECK (successes <= total_samples)
);

CREATE INDEX experiments_status_idx ON experiments (status, created_at DESC);
CREATE INDEX experiments_stopped_at_idx ON experiments (stopped_at) WHERE status = 'stopped';
