# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The built-in filters (`module: builtin:NAME`) are compiled to wasm32-wasip1 and embedded:
# without the target, build.rs leaves them out.
# The binary is built with profile-guided optimisation (loadtest/pgo.sh: an instrumented build
# trained on the benchmark scenarios over loopback, then the optimised build; about three times
# as long as a plain build). `--build-arg PGO=0` builds the plain `dist` profile instead.
ARG PGO=1
RUN rustup target add wasm32-wasip1 \
 && if [ "$PGO" = 1 ]; then \
      bash loadtest/pgo.sh /out/weir; \
    else \
      cargo build --profile dist --locked -p weir && mkdir -p /out && cp target/dist/weir /out/weir; \
    fi \
 && printf 'plugins:\n  - { name: n, module: "builtin:noop" }\n' > /tmp/builtin.yaml \
 && /out/weir validate /tmp/builtin.yaml

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /out/weir /usr/local/bin/weir
COPY configs/ /etc/weir/
USER weir
EXPOSE 8080 8443 9901
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["run", "/etc/weir/quickstart.yaml"]
