# crm-backup worker, scheduler and CLI in one image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
# pg_dump/pg_restore must be at least the server's major version; redis-server reads an RDB
# back for live restores; zstd, age and minisign let operators check and restore with stock
# tools (and make the signing key).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 redis-server zstd age minisign ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/crm-backup /src/target/release/crm-backup-scheduler /usr/local/bin/
COPY config /app/config
# Not root: a restore writes only where this user may (documents beside /data/documents,
# Redis files under /app/restores).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin crm-backup \
 && mkdir -p /data/documents /app/restores /app/backups /app/keys \
 && chown crm-backup:crm-backup /data /data/documents /app/restores /app/backups /app/keys \
 && chmod 700 /app/keys
USER crm-backup
WORKDIR /app
ENV BACKUP_CONFIG_DIR=/app/config BACKUP_ENV=production BACKUP_LOG_FORMAT=json
# The PostgreSQL tools themselves: the pg_dump on PATH is Debian's Perl wrapper, which costs
# about 25 ms of CPU per start (two starts per backup with globals).
ENV BACKUP__POSTGRES__BIN_DIR=/usr/lib/postgresql/15/bin
ENTRYPOINT ["crm-backup"]
CMD ["worker"]
