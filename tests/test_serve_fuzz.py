"""A schemathesis pass over the server's OpenAPI schema: whatever a client sends, no 5xx.

The app runs in-process over an executor of stories260K built with short limits (64 tokens), so
generated requests that pass validation finish quickly.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from kiln import BuildConfig, Builder
from kiln.convert import AutoModelForCausalLM
from kiln.runtime.executor import Executor
from kiln.runtime.llm import DEFAULT_MODEL_DIR
from kiln.serve.app import create_app

SHORT_LIMITS = BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64, tokens_per_block=16,
                           dtype="float32", target="cpu")


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory):
    engine_dir = Builder().build(AutoModelForCausalLM.from_hugging_face(DEFAULT_MODEL_DIR), SHORT_LIMITS).save(
        tmp_path_factory.mktemp("fuzz_engine"), progress=False)
    executor = Executor(engine_dir, progress=False)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(executor))
    executor.shutdown()


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, f"{case.as_curl_command()}\n-> {response.status_code} {response.text}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
