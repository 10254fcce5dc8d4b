# Multi-stage build: compile on the official Rust image, run on a small Debian
# image as a non-root user. Mount your configuration at /etc/portcullis/portcullis.toml:
#   docker build -t portcullis .
#   docker run -p 8080:8080 -v $PWD/portcullis.toml:/etc/portcullis/portcullis.toml:ro portcullis
# (inside a container, listen on 0.0.0.0, e.g. http = "0.0.0.0:8080").
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY tests/fixtures ./tests/fixtures
RUN cargo build --release --locked --bin portcullis

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin portcullis \
 && mkdir -p /etc/portcullis
COPY --from=builder /src/target/release/portcullis /usr/local/bin/portcullis
COPY config.example.toml /etc/portcullis/portcullis.toml
USER 10001
ENV PORTCULLIS_CONFIG=/etc/portcullis/portcullis.toml
EXPOSE 8080 8443 9901
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run"]
