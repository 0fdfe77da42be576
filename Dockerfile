# Builds the weir binary and the shipped plugins (host/build.rs builds plugins/ for
# wasm32-wasip2 along with it); the plugins land in /plugins. Used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN rustup target add wasm32-wasip2 \
 && cargo build --release -p weir \
 && cp target/release/weir /usr/local/bin/weir \
 && mkdir -p /plugins \
 && cp target/plugins/wasm32-wasip2/release/fraud_rule.wasm target/plugins/wasm32-wasip2/release/mask_email.wasm /plugins/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
COPY --from=build /plugins /plugins
ENTRYPOINT ["weir"]
