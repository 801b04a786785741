# syntax=docker/dockerfile:1
# mmserve container: built in the Rust image, run in slim Debian as the non-root user mmserve.
# With no model configured it serves the demo models compiled into the binary; mount your own
# under /models (read-only is enough):
#   docker build -t mmserve .
#   docker run -p 8000:8000 -v /srv/llava-1.5-7b-hf:/models/llava:ro -e MMSERVE_MODEL=/models/llava mmserve
# Config: /etc/mmserve/mmserve.toml (MMSERVE_CONFIG; mount your own file), overridden by
# MMSERVE_MODEL, MMSERVE_HOST, MMSERVE_PORT, MMSERVE_API_KEYS and RUST_LOG. The install and build
# steps are scripts/container-steps.sh, which CI checks without Docker (scripts/deploy-check.sh).
# Dockerfile.cuda is the GPU variant.
ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY scripts/container-steps.sh scripts/
RUN scripts/container-steps.sh build-deps && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY models/demo ./models/demo
RUN scripts/container-steps.sh build

FROM debian:${DEBIAN}-slim
COPY scripts/container-steps.sh /usr/local/lib/mmserve/
RUN /usr/local/lib/mmserve/container-steps.sh runtime-deps \
 && rm -rf /var/lib/apt/lists/* \
 && /usr/local/lib/mmserve/container-steps.sh user
COPY --from=build /src/target/release/mmserve /usr/local/bin/mmserve
COPY config/mmserve.toml /etc/mmserve/mmserve.toml
USER 10001:10001
ENV MMSERVE_HOST=0.0.0.0 MMSERVE_PORT=8000 MMSERVE_CONFIG=/etc/mmserve/mmserve.toml
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD ["curl", "-sf", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["mmserve", "serve"]
