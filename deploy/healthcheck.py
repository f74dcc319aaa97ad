#!/usr/bin/env python3
"""Container health probe of the fedcl image: exit 0 when the service answers, 1 when not.

Installed as ``/opt/fedcl/bin/fedcl-healthcheck`` and run by the image's ``HEALTHCHECK``, the
compose file's healthchecks and the site chart's exec probes. The target is the first argument,
else ``$FEDCL_HEALTHCHECK``:

``tcp://HOST:PORT``
    Something accepts connections there: the SuperLink's one TLS port (``fedcl coordinator up``),
    or a site's SuperNode on its fixed ``--port`` (``fedcl site up``), which listens only while
    the SuperNode runs (the supervisor restarts it with backoff when it loses the SuperLink).
``https://HOST:PORT/PATH`` (or ``http://``)
    The dashboard: healthy on a 2xx or 3xx answer. The probe talks to its own container over
    loopback, so the certificate (issued for the service's name) is not verified.
``none``
    Always healthy (one-shot jobs).

Standard library only; nothing is written, nothing is imported from fedcl (fast, ~30 ms).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

TIMEOUT_S = float(os.environ.get("FEDCL_HEALTHCHECK_TIMEOUT", "4"))


def check_tcp(host: str, port: int, timeout: float = TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        print(f"unhealthy: nothing accepts connections on {host}:{port}: {exc}", file=sys.stderr)
        return False


def check_http(url: str, timeout: float = TIMEOUT_S) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return 200 <= reply.status < 400
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}", file=sys.stderr)
    except (OSError, urllib.error.URLError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    return False


def check(target: str) -> bool:
    if target == "none":
        return True
    parts = urlsplit(target)
    if parts.scheme == "tcp" and parts.hostname and parts.port:
        return check_tcp(parts.hostname, parts.port)
    if parts.scheme in ("http", "https") and parts.netloc:
        return check_http(target)
    raise SystemExit(f"fedcl-healthcheck: unknown target {target!r} (tcp://, https://, none)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = args[0] if args else os.environ.get("FEDCL_HEALTHCHECK", "")
    if not target:
        print("fedcl-healthcheck: give a target or set FEDCL_HEALTHCHECK", file=sys.stderr)
        return 2
    return 0 if check(target) else 1


if __name__ == "__main__":
    sys.exit(main())
