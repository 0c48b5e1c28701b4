# SIRA decision server image. Build: docker build -t sira .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client client
COPY server server
COPY loadtest loadtest
# Both distributions: sira-server depends on sira-client, which comes from ./client.
RUN pip install --no-cache-dir --prefix=/install ./client .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 sira
COPY --from=build /install /usr/local
COPY migrations /app/migrations
ENV SIRA_MIGRATIONS_DIR=/app/migrations \
    SIRA_GRPC_HOST=0.0.0.0 \
    SIRA_GRPC_PORT=50051 \
    SIRA_METRICS_HOST=0.0.0.0 \
    SIRA_METRICS_PORT=9464 \
    SIRA_HTTP_HOST=0.0.0.0 \
    SIRA_HTTP_PORT=8051 \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    PYTHONUNBUFFERED=1
# Compile the numba kernels at build time: no pod pays the ~6 s cold compile.
RUN python -c "from sira_server.domain import bayes; bayes.warm_up()" \
    && chown -R sira /opt/numba-cache
USER sira
WORKDIR /home/sira
EXPOSE 50051 9464 8051
# Production sets SIRA_DATABASE_URL (the sira_app role), SIRA_REDIS_URL and the JWT
# settings; the migration Job runs `sira-server migrate` with SIRA_MIGRATE_DATABASE_URL (the
# schema owner) before the Deployment rolls out. A container listens on every interface.
ENTRYPOINT ["sira-server"]
