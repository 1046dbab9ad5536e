from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ecobatch.config import DEFAULT_PROFILES
from ecobatch.profile import EnergyProfile, load_profile


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """The suite leaves no server behind: every vLLM server and proxy a test started (with its
    engine-core processes) must be stopped by the test that started it."""
    yield
    from ecobatch.testing.servers import left_running

    left = left_running()
    for proc in left:
        proc.stop()
    assert not left, f"processes left running by the tests (now stopped): {[p.name for p in left]}"


@pytest.fixture(scope="session")
def reference_profile() -> EnergyProfile:
    """The embedded static reference (A800 INT8 seed table, per batch size)."""
    return load_profile(DEFAULT_PROFILES["static"])


@pytest.fixture(scope="session")
def continuous_profile() -> EnergyProfile:
    """The embedded continuous reference (H200 vLLM bf16 curve, per concurrency)."""
    return load_profile(DEFAULT_PROFILES["continuous"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Mistral with a BPE tokenizer and chat template, built locally in seconds."""
    from ecobatch.testing.models import build_random_mistral

    return build_random_mistral(tmp_path_factory.mktemp("tiny-mistral"))
