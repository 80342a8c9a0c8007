"""Shared pytest set-up. Heavy optional stacks (vLLM, the LLM extra) are skipped on a developer machine that lacks
them, but in CI (CI=true) a missing stack fails the run: the README's test command installs all of them."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tests.llm_fixtures import tiny_model_path, vllm_engine  # noqa: F401  (session fixtures)
from tests.s3_fixtures import s3_uri  # noqa: F401  (a local S3 endpoint)

