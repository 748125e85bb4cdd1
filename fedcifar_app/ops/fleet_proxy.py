"""Only SuperNodes get in: an nginx reverse proxy that forwards the Fleet API alone.

flwr 1.42's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr ls``, ``flwr supernode register``) and the Runtime API (ServerApps) on one
port, and its Control API has no authentication in this distribution. Whoever can
reach that port can register a key of their own (defeating SuperNode authentication)
and run code on the SuperLink and on every SuperNode. So the SuperLink listens on
127.0.0.1 only, and nginx, from Debian's packages, terminates TLS for the network and
forwards ``/v1/fleet/`` (and ``/health``) to it over TLS, answering everything else
403. The Control API is reached on the SuperLink's host (or through an SSH tunnel to
it), the Runtime API only there.

``NGINX_CONFIG`` is the whole configuration, as docs/deployment.md shows it; ``{listen}`` is
what nginx listens on (``8000``, or ``127.0.0.1:PORT``) and ``{superlink}`` the
SuperLink's loopback address. nginx checks the SuperLink's certificate for the name
``localhost``, which the documented and the launcher's certificates carry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CONFIG_FILE = "fleet-proxy.conf"
# Relative paths are under nginx's prefix (-p), the folder the command runs in.
NGINX_CONFIG = """\
daemon off;
pid nginx.pid;
error_log stderr;
events {{}}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen {listen} ssl;
        ssl_certificate server.pem;
        ssl_certificate_key server.key;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 600s;
        proxy_ssl_trusted_certificate ca.crt;
        proxy_ssl_verify on;
        proxy_ssl_name localhost;
        location /v1/fleet/ {{ proxy_pass https://{superlink}; }}
        location = /health {{ proxy_pass https://{superlink}; }}
        location / {{ return 403; }}
    }}
}}"""
START_COMMAND = 'mkdir -p tmp && nginx -p "$PWD" -c "$PWD/fleet-proxy.conf"'


class ProxyUnavailable(RuntimeError):
    """nginx is not installed."""


def check_available() -> None:
    if shutil.which("nginx") is None:
        raise ProxyUnavailable("the Fleet-only proxy needs nginx: install it (Debian: "
                               "apt-get install nginx-light), or run without TLS")


def write_config(directory: Path, listen: str, superlink: str) -> Path:
    """``directory``/fleet-proxy.conf (next to ca.crt, server.pem and server.key) and
    the tmp folder nginx writes into; the start command runs in ``directory``."""
    (directory / "tmp").mkdir(exist_ok=True)
    path = directory / CONFIG_FILE
    path.write_text(NGINX_CONFIG.format(listen=listen, superlink=superlink) + "\n")
    return path


def command(directory: Path) -> list[str]:
    """``START_COMMAND``'s nginx, with ``directory`` for $PWD."""
    return ["nginx", "-p", str(directory), "-c", str(directory / CONFIG_FILE)]
