"""Shared by the family tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The CPU is shared, and tiny models gain nothing from threads. One thread count for every
    # render also keeps float reductions in one order, so images compare exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
