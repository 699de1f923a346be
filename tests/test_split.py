"""rayseg.split: the train / val split rule that rayseg train and the VOC lists share (pure)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rayseg.errors import RaysegError
from rayseg.split import split_ids


def test_split_is_deterministic_and_disjoint():
    ids = np.arange(1000, 1100)
    train, val = split_ids(ids, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert not set(train) & set(val) and set(train) | set(val) == set(ids)
    shuffled = np.random.default_rng(1).permutation(ids)
    assert np.array_equal(split_ids(shuffled, 0.2, seed=0)[1], val)
    assert not np.array_equal(split_ids(ids, 0.2, seed=1)[1], val)


def test_split_rejects_fraction_leaving_nothing_to_train():
    with pytest.raises(RaysegError, match="no training images"):
        split_ids(np.arange(2), 0.9, seed=0)


def test_the_masks_stage_does_not_import_the_ray_data_stage():
    # export (masks --layout voc) and ingest (train's data) both need the split rule; neither
    # imports the other for it.
    code = "import sys, rayseg.export; sys.exit('rayseg.ingest' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
