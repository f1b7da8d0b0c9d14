from __future__ import annotations

import os
import uuid

import pytest

from helpers import Hosts, Sysctls


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    # CI runs as root; the setup script is run as root too. A non-root run is a mistake.
    assert os.geteuid() == 0, "the bpftune test suite must run as root"


@pytest.fixture
def sysctls():
    s = Sysctls()
    yield s
    s.restore()


@pytest.fixture
def hosts():
    h = Hosts(ns=f"bpftune-test-{uuid.uuid4().hex[:8]}")
    h.create()
    yield h
    h.destroy()
