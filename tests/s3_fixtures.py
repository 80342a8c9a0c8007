"""A local S3 endpoint for the `--output s3://…` tests: moto's server in a thread of the test process, reachable
from every Ray node of this machine. Credentials travel in the URI, so driver subprocesses and Ray workers need no
environment."""

from __future__ import annotations

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
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs = pafs.S3FileSystem(access_key="test", secret_key="test", region="us-east-1", scheme="http",
                           endpoint_override=f"127.0.0.1:{port}", allow_bucket_creation=True)
    fs.create_dir(BUCKET)

    def uri(prefix: str) -> str:
        return f"s3://test:test@{BUCKET}/{prefix}-{uuid.uuid4().hex[:8]}?{query}"

    yield uri
    server.stop()
