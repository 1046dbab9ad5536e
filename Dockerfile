# syntax=docker/dockerfile:1
# ecobatch: the energy-aware batching proxy, as a container image.
#
#   docker build -t ecobatch .                                # base + uvloop (EXTRAS=speed)
#   docker build -t ecobatch:vllm --build-arg EXTRAS=vllm .   # + vLLM for backend vllm-async (needs a GPU)
#   docker build -t ecobatch:hf --build-arg EXTRAS=hf,speed . # + torch/transformers/bitsandbytes (hf-bnb)
#   docker build -t ecobatch:min --build-arg EXTRAS= .        # the base install only
#
# EXTRAS names the extras of pyproject.toml (speed, vllm, cpu, hf, bench), comma-separated. The backend
# vllm-http (a vLLM server elsewhere) and the simulated one need no extra. vLLM in the image (vllm-async)
# compiles Triton's launcher with a C compiler at run time, which the slim base lacks: add
# --build-arg APT_PACKAGES=gcc (Debian packages installed into the final image).
#
#   docker run --rm -p 8080:8080 ecobatch
#
# runs the simulated backend with modelled energy (source="model"), so the image runs anywhere. Settings:
#   * a config file mounted over /etc/ecobatch/ecobatch.yaml (format: configs/ecobatch.yaml; keep
#     server.host 0.0.0.0 so that the port is reachable from outside the container). The shipped energy
#     profiles are in /etc/ecobatch/profiles/, e.g. energy.profile: profiles/h200-vllm-mistral7b-fp8.yaml
#     (a relative path is relative to the config file);
#   * the environment: API keys in ECOBATCH_API_KEYS and admin keys in ECOBATCH_ADMIN_KEYS
#     (comma-separated; the variable names are server.api_keys_env / server.admin_keys_env);
#   * flags, which override the file: docker run ... ecobatch ecobatch serve --config
#     /etc/ecobatch/ecobatch.yaml --backend vllm-http --upstream http://vllm:8000 (ecobatch serve --help).
# The health check asks ECOBATCH_HEALTH_URL (default http://127.0.0.1:8080/health): set it when the
# config moves the port.

ARG PYTHON_IMAGE=python:3.12-slim

# ---- build: the ecobatch wheel, installed with its extras into a virtual environment ----------------
FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=speed
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/ecobatch \
 && set -- /dist/ecobatch-*.whl \
 && /opt/ecobatch/bin/pip install "$1${EXTRAS:+[$EXTRAS]}" \
 && /opt/ecobatch/bin/ecobatch --version

# ---- runtime: the virtual environment, the shipped profiles and the default config, a non-root user -
FROM ${PYTHON_IMAGE}
ARG EXTRAS=speed
ARG APT_PACKAGES=
LABEL org.opencontainers.image.title="ecobatch" \
      org.opencontainers.image.description="Energy-aware batching proxy for LLM serving: batches on a measured energy curve and exports joules per request." \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ecobatch.extras="${EXTRAS}"
ENV PATH=/opt/ecobatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ECOBATCH_HEALTH_URL=http://127.0.0.1:8080/health
RUN if [ -n "$APT_PACKAGES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $APT_PACKAGES \
      && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --system --gid 10001 ecobatch \
 && useradd --system --uid 10001 --gid ecobatch --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ecobatch
COPY --from=build /opt/ecobatch /opt/ecobatch
COPY configs/profiles/ /etc/ecobatch/profiles/
# The default: the simulated backend on 0.0.0.0:8080, energy modelled (the compose cpu stack's config).
COPY deploy/compose/ecobatch-sim.yaml /etc/ecobatch/ecobatch.yaml
USER 10001:10001
EXPOSE 8080
# /health answers 200 only while ecobatch can serve (ready, and for vllm-http the upstream up).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['ECOBATCH_HEALTH_URL'], timeout=4)"]
# On SIGTERM ecobatch drains: new requests get 503, queued and in-flight ones get server.shutdown_grace_s
# (30 s) to finish, and it exits within that plus 2 s: stop it with a longer timeout than docker's 10 s
# (docker stop -t 35; compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["ecobatch", "serve", "--config", "/etc/ecobatch/ecobatch.yaml"]
