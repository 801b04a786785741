# mmserve container: build in the Rust image, run in slim Debian as non-root.
# With no model configured it serves the demo models compiled into the binary;
# mount your own at /models: docker run -v /path/to/model:/models/model -e MMSERVE_MODEL=/models/model ...
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libturbojpeg0-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY models/demo ./models/demo
RUN cargo build --release --locked --bin mmserve

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libturbojpeg0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 mmserve
COPY --from=build /src/target/release/mmserve /usr/local/bin/mmserve
COPY config/mmserve.toml /etc/mmserve/mmserve.toml
USER mmserve
ENV MMSERVE_HOST=0.0.0.0 MMSERVE_PORT=8000 MMSERVE_CONFIG=/etc/mmserve/mmserve.toml
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD curl -sf http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["mmserve", "serve"]
