"""Fixtures for the end-to-end suite: a real `vllm serve` (CPU build, tiny local model) and
`airgate serve` in front of it, both as real processes on loopback.

The suite needs the cache built by `tests/e2e/setup_vllm.sh` (3.4 GB, minutes), so it runs
only when AIRGATE_E2E=1 (`make e2e` sets it); a plain `pytest` / `make test` skips the whole
directory at collection time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    NODE_DIR,
    SERVED_NAME,
    TOKEN_NAME,
    Airgate,
    Vllm,
    airgate_config,
    free_port,
    new_token,
    start_airgate,
    start_vllm,
)

E2E_ENABLED = os.environ.get("AIRGATE_E2E") == "1"
if not E2E_ENABLED:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vllm]:
    server = start_vllm(tmp_path_factory.mktemp("vllm"))
    yield server
    server.service.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import trustme

    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": where / "ca.pem", "cert": where / "fullchain.pem", "key": where / "privkey.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    with paths["cert"].open("wb") as chain:
        for blob in cert.cert_chain_pems:
            chain.write(blob.bytes())
    return paths


@pytest.fixture(scope="session")
def airgate(vllm: Vllm, pki: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airgate]:
    workdir = tmp_path_factory.mktemp("airgate")
    tokens = workdir / "tokens"
    token = new_token(tokens, TOKEN_NAME)
    https_port, metrics_port = free_port(), free_port()
    config = airgate_config(workdir, pki, upstream_port=int(vllm.url.rsplit(":", 1)[1]),
                            api_key_file=vllm.key_file, tokens_file=tokens,
                            https_port=https_port, metrics_port=metrics_port)
    gate = start_airgate(workdir, pki, "serve", config, https_port, metrics_port, token)
    yield gate
    gate.service.stop()


@pytest.fixture(scope="session")
def node_env(airgate: Airgate) -> dict[str, str]:
    """Environment for the Node client scripts in tests/e2e/node/."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "axios").is_dir():
        pytest.fail(f"no node modules in {NODE_DIR}: run tests/e2e/setup_vllm.sh", pytrace=False)
    return {**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules"), "E2E_URL": airgate.url,
            "E2E_TOKEN": airgate.token, "E2E_CA": str(airgate.ca_file), "E2E_MODEL": SERVED_NAME}
