import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def rule_threshold_half(monkeypatch):
    """Pin the threshold rule's default ``t`` to 0.5 (the shipped default is ``auto``).

    The scenes of ``synthetic_helpers`` put the truth at the middle of a symmetric
    ramp followed by a flat rim plateau, where ``t = 0.5`` is exact by construction;
    the automatic edge model (step plus decaying rim, :mod:`segsem_cli.edge_model`)
    reads such a plateau 0.3 px into the resist. Tests of the rule's geometry use
    this fixture; ``threshold=auto`` has its own tests (``tests/test_edge_model.py``).
    """
    from segsem_cli import edges

    monkeypatch.setattr(edges, "DEFAULT_THRESHOLD", 0.5)
