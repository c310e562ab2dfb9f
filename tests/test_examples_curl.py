"""examples/curl/run.sh: a suite in another language (a shell script with
curl) starts `python -m mailboxd.testing --http 0`, sends mail over SMTP and
asserts over the HTTP API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import need

ROOT = Path(__file__).resolve().parent.parent


def test_the_curl_example_passes(tmp_path):
    need("curl")
    out = subprocess.run(
        ["bash", str(ROOT / "examples" / "curl" / "run.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        cwd=tmp_path,  # the installed mailboxd, not the checkout
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "examples/curl: all passed" in out.stdout
