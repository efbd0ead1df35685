"""Shared test set-up: nothing a test converts or downloads lands in the user's cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["MNV3_CACHE"] = str(tmp_path_factory.mktemp("mnv3-cache"))
