# Multi-stage build: compile with the Rust toolchain, run on debian-slim as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin switchboard

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/switchboard --create-home switchboard
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
# An empty workflows directory: mount yours there (./workflows holds the quick start's
# workflow, which posts to a sink on 127.0.0.1 and has no place in a container).
RUN mkdir -p /etc/switchboard/workflows
USER switchboard
WORKDIR /var/lib/switchboard
ENV SWITCHBOARD_LISTEN=0.0.0.0:8080 \
    SWITCHBOARD_WORKFLOWS=/etc/switchboard/workflows \
    SWITCHBOARD_DATABASE_URL=sqlite:///var/lib/switchboard/switchboard.db
EXPOSE 8080
# No curl in the image: bash's /dev/tcp asks /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["switchboard"]
CMD ["serve"]
