"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest


@pytest.fixture
def fast_tmp(tmp_path):
    """A directory for NVM tiers: on /dev/shm (tmpfs, as in deployment, and
    immune to disk fsync latency on a busy machine) when there is one,
    otherwise tmp_path.  Removed afterwards."""
    shm = pathlib.Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = pathlib.Path(tempfile.mkdtemp(prefix="hvext-test-region-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
