"""The namespace cluster, one per test module (tests/cluster/nscluster.py builds and removes it).

Where namespaces cannot be made here (not root, no `unshare`), every test of these modules skips
with one line saying why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import nscluster  # noqa: E402


@pytest.fixture(scope="module")
def ns():
    why = nscluster.why_unavailable()
    if why:
        pytest.skip(f"namespace cluster unavailable: {why}")
    c = nscluster.NsCluster()
    try:
        yield c.up()
    finally:
        c.down()
        assert c.leftovers() == [], "namespaces left behind"
