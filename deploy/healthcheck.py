"""The platform image's health check (Dockerfile HEALTHCHECK): `python deploy/healthcheck.py`.

Asks the web server in this container for `/livez` (the process serves requests; nothing else is checked,
so an outage of PostgreSQL never restarts web servers). Sends a Host of ALLOWED_HOSTS (production refuses
any other) and needs no TLS: the probes are exempt from the HTTPS redirect. Exit 0 when it answers 200.
"""

from __future__ import annotations

import http.client
import os
import sys


def probe_host() -> str:
    for host in os.environ.get("ALLOWED_HOSTS", "").split(","):
        host = host.strip().lstrip(".")  # ".example.com" allows example.com and its subdomains
        if host and host != "*":
            return host
    return "localhost"


def main() -> int:
    conn = http.client.HTTPConnection("127.0.0.1", int(os.environ.get("PORT", "8000")), timeout=5)
    try:
        conn.request("GET", "/livez", headers={"Host": probe_host()})
        status = conn.getresponse().status
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"unhealthy: /livez answered {status}", file=sys.stderr)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
