from __future__ import annotations

from pathlib import Path

import pytest

from ecobatch.config import DEFAULT_PROFILE
from ecobatch.profile import EnergyProfile, load_profile


@pytest.fixture(scope="session")
def reference_profile() -> EnergyProfile:
    return load_profile(DEFAULT_PROFILE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Mistral with a BPE tokenizer and chat template, built locally in seconds."""
    from ecobatch.testing.models import build_random_mistral

    return build_random_mistral(tmp_path_factory.mktemp("tiny-mistral"))
