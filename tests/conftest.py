"""Test set-up: 4 fake CPU devices, CPU only, and the shared data directory.

The environment must be set before JAX is imported anywhere, so this runs first.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_dir() -> pathlib.Path | None:
    """The public datasets, from $TWOTOWER_DATA_DIR (CI sets it to ../shared/data)."""
    path = os.environ.get("TWOTOWER_DATA_DIR")
    return pathlib.Path(path) if path else None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = data_dir()
    if path is None or not path.is_dir():
        pytest.skip("TWOTOWER_DATA_DIR is not set to the public datasets directory")
    return path


@pytest.fixture
def reads(monkeypatch):
    """Records every `PreparedData.load_users` call (users asked for) and every record read (users per read)."""
    from types import SimpleNamespace

    import numpy as np

    from data.prepared.read import PreparedData
    seen = SimpleNamespace(load_users=[], records=[])
    load_users, records = PreparedData.load_users, PreparedData.records

    def counted_load_users(self, users=None):
        seen.load_users.append(self.num_users if users is None else len(np.unique(users)))
        return load_users(self, users)

    def counted_records(self, users):
        seen.records.append(len(users))
        return records(self, users)

    monkeypatch.setattr(PreparedData, "load_users", counted_load_users)
    monkeypatch.setattr(PreparedData, "records", counted_records)
    return seen
