"""A local S3 endpoint for the `--output s3://…` tests: moto's server in its own process, reachable from every Ray
node of this machine. Credentials travel in the URI, so driver subprocesses and Ray workers need no environment.

Not in a thread of the test process: moto's server imports flask, whose `current_app` proxy then sits in
sys.modules, and vLLM's CPU kernel registration probes every module global (`hasattr(value, "__dict__")`), which
raises "Working outside of application context" on that proxy, so every in-process vLLM engine built after an S3 test
would fail."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import need

BUCKET = "moralsim-test"


@pytest.fixture(scope="session")
def s3_uri() -> Iterator[Callable[[str], str]]:
    """s3_uri(prefix) -> an s3:// URI of a fresh prefix in the test bucket."""
    need("moto")
    import pyarrow.fs as pafs

    with socket.socket() as probe:  # a free port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:  # until it answers
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
            time.sleep(0.1)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs = pafs.S3FileSystem(access_key="test", secret_key="test", region="us-east-1", scheme="http",
                           endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True)
    fs.create_dir(BUCKET)

    def uri(prefix: str) -> str:
        return f"s3://test:test@{BUCKET}/{prefix}-{uuid.uuid4().hex[:8]}?{query}"

    yield uri
    server.terminate()
    server.wait(timeout=30)
