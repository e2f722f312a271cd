"""Attacks on the shared throttle stores (the supervisor's, Redis), each seen to fail before its
fix: against a real redis-server, with a relay in front of it where a reply must be late.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("password", ["s3/cret", "s3#cret", "s3?cret"])
def test_a_bad_redis_url_is_refused_without_echoing_its_password(
    htpasswd_file: Path, password: str
) -> None:
    """Generated passwords (base64) hold `/`: unencoded, it ends the URL's authority early, and
    the error message printed the whole URL, password included."""
    env = {**os.environ, "PROXY_HTPASSWD": str(htpasswd_file),
           "PROXY_SHARED_STATE": f"redis://:{password}@redis:6379/0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config"], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2, done
    assert "shared_state: expected redis://HOST:PORT/DB" in done.stderr
    assert "redis://:***@redis:6379/0" in done.stderr
    assert "s3" not in done.stderr + done.stdout
