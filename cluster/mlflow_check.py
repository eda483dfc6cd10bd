"""Deployment check of an MLflow tracking server: exit 1 with one line per problem, 0 when none.

    python cluster/mlflow_check.py http://mlflow.internal:5000

Checks, from the outside, what cluster/mlflow-server.sh promises: requests without credentials
are refused; the default admin password (admin / password1234) no longer works; a request with a
foreign Host header is refused; artifact paths that climb out of the store ('..', encoded or not)
are refused.
"""

from __future__ import annotations

import base64
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT_ADMIN = ("admin", "password1234")


def status(url: str, auth: tuple[str, str] | None = None, host: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def problems(base: str, user: tuple[str, str] | None = None) -> list[str]:
    base = base.rstrip("/")
    found = []
    api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    if status(api) < 400:
        found.append("a request without credentials was answered")
    if status(api, DEFAULT_ADMIN) < 400:
        found.append("the default admin password (admin/password1234) still works: change it")
    if status(api, user, host="evil.example.com") < 400:
        found.append("a request with a foreign Host header was answered (set --allowed-hosts)")
    for path in ("../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd"):
        code = status(f"{base}/api/2.0/mlflow-artifacts/artifacts/{path}", user)
        if code < 400:
            found.append(f"artifact path {path} was served (HTTP {code})")
    host = urlsplit(base).hostname or ""
    if host in ("0.0.0.0", "::"):
        found.append("the server is addressed on all interfaces")
    return found


def main(argv: list[str] | None = None) -> int:
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: mlflow_check.py http://HOST:PORT   (MLFLOW_TRACKING_USERNAME/PASSWORD: a valid user)", file=sys.stderr)
        return 2
    user = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    found = problems(argv[0], user)
    for p in found:
        print(f"mlflow_check: FAIL: {p}", file=sys.stderr)
    if not found:
        print(f"mlflow_check: {argv[0]}: OK")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
