# registry-proxy image:  docker build -t registry-proxy:0.1.0 .
# In production pin the base by digest and label the build (docs/swarm.md, "Step by step",
# step 2):
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:... \
#       --build-arg REVISION="$(git rev-parse HEAD)" --build-arg SOURCE=https://... -t ... .
#
# Runs `registry-proxy serve` as an unprivileged user (uid 10001) with its configuration at
# /etc/registry-proxy/proxy.yml (PROXY_CONFIG: deploy/proxy.yml; mount your own over it, or set
# PROXY_<KEY> variables) and the user list at /run/secrets/htpasswd. Ports: 8080 public, 8081
# admin (/healthz, /readyz, /metrics). The other commands work too, e.g. (as yourself, so that
# the files in ./secrets stay yours):
#   docker run --rm -it -u "$(id -u):$(id -g)" -v "$PWD/secrets:/run/secrets" IMAGE passwd add alice
#   docker run --rm -u "$(id -u):$(id -g)" -v "$PWD/secrets:/run/secrets" IMAGE check-config
# deploy/stack.yml runs it on Docker Swarm (docs/swarm.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build stage: the package and its dependencies in a virtual environment, at the versions in
# constraints.txt (scripts/pin-deps), so every build installs what the tests ran. All are wheels
# but python-ldap, built here against Debian's libldap (its compiler stays in this stage).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Debian's own python3 (a base without the official image's headers) needs python3-dev too.
RUN headers="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
 && if [ -f "$headers/Python.h" ]; then dev=; else dev=python3-dev; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libldap-dev libsasl2-dev $dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/registry-proxy
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxy/ proxy/
# python-ldap installs `slapdtest`, its test helper with test keys: not for an image.
RUN /opt/registry-proxy/bin/pip install . --constraint constraints.txt \
 && rm -rf /opt/registry-proxy/lib/python3*/site-packages/slapdtest \
 && /opt/registry-proxy/bin/registry-proxy --version

# Final stage: the same Python, the virtual environment, no compilers, no pip cache, no sources;
# libldap for python-ldap (LDAP logins).
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libldap-2.5-0 libsasl2-2 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 registry-proxy \
 && useradd --system --uid 10001 --gid registry-proxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin registry-proxy
COPY --from=build /opt/registry-proxy /opt/registry-proxy
COPY deploy/proxy.yml /etc/registry-proxy/proxy.yml
ENV PATH=/opt/registry-proxy/bin:$PATH \
    PROXY_CONFIG=/etc/registry-proxy/proxy.yml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 8081
# Liveness from the admin listener, with the interpreter the image already has (no curl, no wget).
# Change the port here if you change admin_listen.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=4).status == 200 else 1)"]
# SIGTERM starts the drain (shutdown_timeout); the process is PID 1 and handles it itself.
STOPSIGNAL SIGTERM
# OCI labels; VERSION is pyproject.toml's version, the others come from the build command.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="registry-proxy" \
      org.opencontainers.image.description="Authenticating, streaming reverse proxy for a private Docker/OCI registry" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
ENTRYPOINT ["registry-proxy"]
CMD ["serve"]
