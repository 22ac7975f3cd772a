import os

import pytest
import torch

# Tests never download and never touch a user's cache.
os.environ.setdefault("KDCOURSE_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCOURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDCOURSE_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)
    yield
