# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The built-in filters (`module: builtin:NAME`) are compiled to wasm32-wasip1 and embedded:
# without the target, build.rs leaves them out.
RUN rustup target add wasm32-wasip1 \
 && cargo build --profile dist --locked -p weir \
 && printf 'plugins:\n  - { name: n, module: "builtin:noop" }\n' > /tmp/builtin.yaml \
 && target/dist/weir validate /tmp/builtin.yaml

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /src/target/dist/weir /usr/local/bin/weir
COPY configs/ /etc/weir/
USER weir
EXPOSE 8080 8443 9901
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["run", "/etc/weir/quickstart.yaml"]
