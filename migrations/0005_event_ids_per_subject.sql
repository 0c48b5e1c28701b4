-- Event ids (Track's client_event_id) are idempotency keys per subject (issue 11):
-- an experiment's hot state may be split into shards by subject, and a Lua script
-- sees only its subject's shard, so Redis deduplicates (event id, subject). The
-- system of record must agree, or an event id reused for another subject would be
-- acknowledged by Redis and silently dropped here by the old key.
ALTER TABLE experiment_metrics DROP CONSTRAINT experiment_metrics_pkey;
ALTER TABLE experiment_metrics ADD PRIMARY KEY (experiment_id, molam_id, event_id);
