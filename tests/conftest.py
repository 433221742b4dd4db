"""Shared test fixtures.

`shared_data` points at ../shared/data (real C4, LAMBADA and the GPT-NeoX tokenizer). A test that needs a
file there fails when CI is set and the file is missing, and is skipped only on a developer machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("PALM_EVAL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
    """A function: shared_data("lambada_test.jsonl") -> Path, failing (CI) or skipping (local) when missing."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.is_file():
            message = f"{path} is missing: tests need ../shared/data beside the repository"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        return path

    return get


@pytest.fixture(scope="session")
def neox_tokenizer(shared_data):
    from palm_eval import load_tokenizer

    return load_tokenizer(shared_data("gpt-neox-20b-tokenizer.json"))


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (and the test machine is shared); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
