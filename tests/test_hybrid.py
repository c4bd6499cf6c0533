"""The per-feature judge of the hybrid: refinement of backbone contours, confidence, spill gate, routing."""
from pathlib import Path

import numpy as np
import pytest

from segsem_cli.hybrid import candidates, judge, select, spill_fractions
from segsem_cli.plugins import get_fallback
from segsem_cli.transform import PixelTransform
from segsem_cli.types import Feature, FeatureResult, SEMImage

from synthetic_helpers import convention_edge, rect, render


class FakeModel:
    """A backbone returning given contours (None = not found) with a given confidence."""

    meta: dict = {}

    def __init__(self, contours, conf=0.9):
        self.contours, self.conf = contours, conf

    def predict(self, image, features):
        return [FeatureResult(f.feature_id, c, "sam2", self.conf, "ok" if c is not None else "not_found")
                for f, c in zip(features, self.contours)]


def box(u0, v0, u1, v1):
    return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], float)


def scene():
    """Two bright resist rectangles with known edges, and their layout features."""
    rects = [(20.0, 30.0, 44.0, 98.0), (70.0, 30.0, 94.0, 98.0)]
    img = render([rect(*r) for r in rects], (128, 128), blur=1.0, noise=0.01, seed=1)
    t = PixelTransform((0.0, 0.0), 1.0, img.shape)
    feats = [Feature(f"p{i}", t.to_layout(box(*r)), box(*r)) for i, r in enumerate(rects)]
    return SEMImage(Path("x.tif"), img, t), feats, rects


def test_judge_formula():
    p = judge(0.81, 0.8, 0.0, 1.0)
    assert p["layout"] == 1.0 and p["agree"] == 1.0 and p["excl"] == 1.0
    assert p["confidence"] == pytest.approx(0.81 ** 0.4)
    p = judge(0.81, 0.55, None, 0.5)
    assert p["layout"] == pytest.approx(0.5) and p["agree"] == 0.5
    assert p["confidence"] == pytest.approx(0.81 ** 0.4 * 0.5 ** 0.2 * 0.5 ** 0.2 * 0.5 ** 0.2)
    assert judge(0.9, 0.9, 0.0, 1.0, spill=0.25)["excl"] == pytest.approx(0.5)
    assert judge(0.9, 0.9, 0.0, 1.0, spill=0.45)["confidence"] == 0.0


def test_spill_fractions():
    lay = [box(0, 0, 10, 10), box(20, 0, 30, 10)]
    c = [box(0, 0, 25, 10), box(21, 1, 29, 9), None]
    s = spill_fractions(c, lay + [box(50, 50, 60, 60)])
    assert s[0] == pytest.approx(0.5) and s[1] == 0.0 and s[2] == 0.0


def test_backbone_contour_refined_onto_the_edge():
    image, feats, rects = scene()
    # coarse "mask" contours 2 px too large on every side (as from a quarter-resolution mask)
    coarse = [box(r[0] - 2, r[1] - 2, r[2] + 2, r[3] + 2) for r in rects]
    cands, _ = candidates(image, feats, fallback=get_fallback("threshold"), model=FakeModel(coarse))
    edge = convention_edge(blur=1.0)  # where the default rule puts a straight edge, px into the resist
    for cand, r in zip(cands, rects):
        b = cand.backbone
        assert b.ok and b.source == "sam2"
        # the left edge of the refined contour, away from the corners
        pts = b.contour_px[(b.contour_px[:, 1] > r[1] + 8) & (b.contour_px[:, 1] < r[3] - 8)]
        left = pts[pts[:, 0] < (r[0] + r[2]) / 2][:, 0]
        assert np.mean(left) == pytest.approx(r[0] + edge, abs=0.1)
        assert b.extra["refine_shift_px"] > 1.5
        assert b.confidence > 0.7  # agrees with the layout, the fallback and the edges


def test_spilled_mask_goes_to_the_fallback_and_bad_both_fail():
    image, feats, rects = scene()
    spilled = box(15, 25, 99, 103)  # one mask covering both features
    cands, _ = candidates(image, feats, fallback=get_fallback("threshold"), model=FakeModel([spilled, None]))
    assert cands[0].backbone.confidence == 0.0 and cands[0].backbone.extra["c_excl"] == 0.0
    out = select(cands, 0.3)
    assert [r.source for r in out] == ["threshold", "threshold"] and all(r.ok for r in out)
    assert out[0].extra["backbone_confidence"] == 0.0
    # backbone-only mode keeps the (bad) mask and never falls back
    out_b = select(cands, 0.3, mode="backbone")
    assert out_b[0].source == "sam2" and out_b[1].status == "failed"


def test_select_routing():
    ok_b = FeatureResult("p", np.zeros((4, 2)) + [[0, 0], [1, 0], [1, 1], [0, 1]], "sam2", 0.6)
    ok_f = FeatureResult("p", np.zeros((4, 2)) + [[0, 0], [2, 0], [2, 2], [0, 2]], "threshold", 0.8)
    bad_f = FeatureResult("p", None, "threshold", 0.0, "not_found")
    from segsem_cli.hybrid import Candidate

    assert select([Candidate("p", ok_b, ok_f)], 0.5)[0].source == "sam2"
    assert select([Candidate("p", ok_b, ok_f)], 0.7)[0].source == "threshold"
    r = select([Candidate("p", ok_b, bad_f)], 0.7)[0]
    assert r.status == "failed" and r.contour_px is None  # never exported as a guess
    assert select([Candidate("p", ok_b, ok_f)], 0.5, mode="fallback")[0].source == "threshold"
    assert select([Candidate("p", None, ok_f)], 0.0)[0].source == "threshold"
