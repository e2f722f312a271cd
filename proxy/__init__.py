"""registry-proxy: an authenticating, streaming reverse proxy for a Docker/OCI registry."""

__version__ = "0.1.0"
