"""The real edges in front of the proxy: Debian's HAProxy and nginx on loopback ports."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.harness import Process, free_port
from tests.support.polling import wait_until

HAPROXY = "/usr/sbin/haproxy"
NGINX = "/usr/sbin/nginx"


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Edge:
    """An edge server run in the foreground from a configuration written for the test."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None

    def run(self, args: list[str]) -> None:
        self.process = Process(args, self.workdir / "edge.log")
        self.process.start()
        assert self.process.popen is not None
        popen = self.process.popen

        def listening() -> bool:
            assert popen.poll() is None, f"{args[0]} exited:\n{self.log()}"
            return accepts(self.port)

        wait_until(listening, f"{args[0]} to listen")

    def log(self) -> str:
        assert self.process is not None
        return self.process.log()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_haproxy(workdir: Path, backend_port: int, *, mode: str, server_options: str) -> Edge:
    """HAProxy in `mode` (tcp or http) forwarding to 127.0.0.1:`backend_port`."""
    workdir.mkdir(parents=True, exist_ok=True)
    edge = Edge(workdir)
    http = "    option forwardfor\n" if mode == "http" else ""
    config = workdir / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 200
defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend edge
    bind 127.0.0.1:{edge.port}
{http}    default_backend proxy
backend proxy
    server proxy 127.0.0.1:{backend_port} {server_options}
"""
    )
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    edge.run([HAPROXY, "-db", "-f", str(config)])
    return edge


def start_nginx(workdir: Path, backend_port: int, tls: dict[str, str] | None = None) -> Edge:
    """nginx as the usual reverse proxy: `proxy_add_x_forwarded_for`, streaming both ways; with
    `tls` (PROXY_TLS_CERT and PROXY_TLS_KEY), terminating TLS with its defaults (banner too)."""
    workdir.mkdir(parents=True, exist_ok=True)
    edge = Edge(workdir)
    config = workdir / "nginx.conf"
    listen = f"127.0.0.1:{edge.port}"
    if tls:
        listen += f" ssl;\n        ssl_certificate {tls['PROXY_TLS_CERT']}"
        listen += f";\n        ssl_certificate_key {tls['PROXY_TLS_KEY']}"
    config.write_text(
        f"""daemon off;
master_process off;
error_log {workdir}/error.log info;
pid {workdir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen {listen};
        client_max_body_size 0;
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""
    )
    edge.run([NGINX, "-p", str(workdir), "-c", str(config)])
    return edge
