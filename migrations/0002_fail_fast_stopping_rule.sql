-- The always-valid stopping rule's settings (docs/statistics.md, "Stopping rule").
-- Existing experiments get the defaults; nothing else changes.

ALTER TABLE experiments
    ADD COLUMN fail_fast_error_rate double precision NOT NULL DEFAULT 0.05
        CHECK (fail_fast_error_rate > 0 AND fail_fast_error_rate <= 0.5),
    ADD COLUMN fail_fast_min_effect double precision NOT NULL DEFAULT 0.02
        CHECK (fail_fast_min_effect > 0 AND fail_fast_min_effect < 1);
