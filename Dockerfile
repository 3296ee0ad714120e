# syntax=docker/dockerfile:1
# One image for every sluice role: sluice, sluice-orchestrator, sluice-learner,
# sluice-actor and sluice-reward-server, linked against the libtorch of the
# PyTorch 2.11 wheel (tch 0.24). The Helm chart runs it as user 10001.
#
#   docker build -t sluice:0.1.0 .                                   # CPU wheel
#   docker build -t sluice:0.1.0-cu130 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .   # CUDA 13
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Build: Debian bookworm's Python 3.11 in both stages, so the venv moves as is.
FROM rust:1.95-bookworm AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
ENV PATH=/opt/torch/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
# The binaries get an rpath to /opt/torch/.../torch/lib (build/link_libtorch.rs).
RUN cargo build --release --locked \
      -p sluice-cli -p sluice-orchestrator -p sluice-learner -p sluice-actor -p sluice-reward-server \
 && mkdir /out \
 && cp target/release/sluice target/release/sluice-orchestrator target/release/sluice-learner \
       target/release/sluice-actor target/release/sluice-reward-server /out/

# Runtime: the binaries, the torch wheel's libraries (and, for CUDA wheels, the
# nvidia-* libraries it pulls in, found through the wheel's own rpaths).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --home-dir /data --no-create-home sluice \
 && mkdir -p /data && chown sluice:sluice /data
COPY --from=build /opt/torch /opt/torch
COPY --from=build /out/ /usr/local/bin/
COPY examples /usr/local/share/sluice/examples
ENV OMP_NUM_THREADS=4
USER 10001
WORKDIR /data
CMD ["sluice", "--help"]
