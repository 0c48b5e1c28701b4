"""I/O with the two stores: Postgres (system of record) and Redis (hot state).

`postgres` opens connections and pools (json/jsonb as Python objects),
`migrate` applies `migrations/*.sql` once each, and the other modules hold
the repositories, the Redis hot state with its Lua scripts, and the
write-behind flusher that copies Redis streams into Postgres.
"""
