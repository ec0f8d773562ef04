# syntax=docker/dockerfile:1
# inference-router image: wheels built in one stage (the hot modules compiled by mypyc),
# installed without build tools in the next.
#   docker build -t inference-router .
#   docker run --rm -p 7070:7070 inference-router
# The default command runs the embedded default (two spawned echo backends), the
# length-prefixed listener on all interfaces and the admin API on the container's loopback
# only. The admin API is never served off loopback without credentials (the router refuses
# to start): to publish it, give it a bearer token (or admin.tls client certificates):
#   docker run --rm -p 7070:7070 -p 7072:7072 -v $PWD/router.toml:/etc/inference-router/router.toml:ro \
#     -v $PWD/admin.token:/run/secrets/admin.token:ro \
#     -v router-state:/var/lib/inference-router inference-router \
#     --config /etc/inference-router/router.toml --listen 0.0.0.0:7070 \
#     --admin 0.0.0.0:7072 --admin-token-file /run/secrets/admin.token \
#     --state-file /var/lib/inference-router/state.toml
# What the admin API changes (added backends, drain flags, weights) is saved in the state file
# on the volume /var/lib/inference-router and restored when the container starts again.

FROM python:3.11-slim AS builder
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# gcc for mypyc (the image has the Python headers); only this stage has it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md setup.py ./
COPY build_backend ./build_backend
COPY router ./router
COPY backends ./backends
# The project's own wheel with the hot modules compiled (ROUTER_COMPILE=1: the build backend
# adds mypy to the isolated build environment), then the wheels of its runtime dependencies
# (from that wheel, so no pure one is built beside it).
RUN ROUTER_COMPILE=1 pip wheel --no-deps -w /wheels . \
 && pip wheel -w /wheels /wheels/inference_router-*.whl

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels inference-router \
 && useradd --system --create-home --home-dir /home/router --shell /usr/sbin/nologin router \
 && install -d -o router -g router -m 0700 /var/lib/inference-router
# A reference config with every option at its default (it listens on 127.0.0.1 and names
# example backends: mount your own over it, or override --listen/--admin/--backend).
COPY examples/router.toml /etc/inference-router/router.toml
USER router
# Spawned backends' logs go to $ROUTER_LOG_DIR (default .router-logs in the working directory).
WORKDIR /home/router
EXPOSE 7070 7072
# Declared after the directory exists, so a new volume starts owned by the router user.
VOLUME ["/var/lib/inference-router"]
ENTRYPOINT ["inference-router", "serve"]
CMD ["--listen", "0.0.0.0:7070", "--admin", "127.0.0.1:7072", \
     "--state-file", "/var/lib/inference-router/state.toml"]
