"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public datasets in ``../shared/data`` (read-only); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in synthetic world, preset ``tiny`` (read-only: tests train on it, never write it)."""
    from data.synthetic import prepare_synthetic

    return prepare_synthetic(tmp_path_factory.mktemp("data") / "tiny", "tiny", seed=0)
