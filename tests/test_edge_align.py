"""Alignment refinement from extracted edges (segsem_cli.edge_align)."""
from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon

from segsem_cli.contours import resample_closed
from segsem_cli.edge_align import midline_samples, refine_offset, scan_crossings

SHAPE = (256, 256)


def rect(u0, v0, u1, v1):
    return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=float)


def printed(design, bias, shift, *, step=1.0, join=1):
    """The design grown by ``bias`` px per side (round corners), moved by ``shift``, resampled."""
    p = Polygon(design).buffer(bias, join_style=join)
    c = np.asarray(p.exterior.coords)[:-1] + np.asarray(shift)
    return resample_closed(c, step)


def test_scan_crossings_rectangle_rows_and_columns():
    r = rect(10.2, 20.7, 30.4, 25.3)  # rows v = r + .5 in [20.7, 25.3): r = 21 .. 24
    line, pos, seg = scan_crossings(r, 0)
    assert sorted(set(line.tolist())) == [21, 22, 23, 24]
    assert np.allclose(np.sort(pos[line == 22]), [10.2, 30.4])
    line, pos, _ = scan_crossings(r, 1)  # columns u = c + .5 in [10.2, 30.4): c = 10 .. 29
    assert line.min() == 10 and line.max() == 29 and np.allclose(np.sort(pos[line == 15]), [20.7, 25.3])


@pytest.mark.parametrize("bias", [-1.7, 0.0, 2.3])
def test_bias_cancels_and_the_shift_is_recovered(bias):
    shift = (0.37, -0.21)
    designs = [rect(40, 20, 70, 230), rect(120, 20, 160, 230),      # vertical lines: u evidence
               rect(180, 40, 250, 60), rect(180, 100, 250, 128),    # horizontal bars: v evidence
               rect(200, 170, 230, 200)]                            # a square: both axes
    contours = [printed(d, bias, shift) for d in designs]
    res = refine_offset(contours, designs, SHAPE)
    assert res.applied == (True, True)
    assert res.shift_px == pytest.approx(shift, abs=0.02)
    # the square's sides are as long as its width: bias and rounding are as symmetric as a line's,
    # so its 30 - 2 * 8 rows and columns clear of the corners measure the shift too
    for axis in (0, 1):
        s = midline_samples(contours[4], designs[4], SHAPE, axis)
        assert len(s) == 14 and np.allclose(s, shift[axis], atol=0.01)
    # a 40 x 30 bar: along rows its 30 px sides are shorter than the 40 between them (line ends);
    # along columns its 40 px sides count, 40 - 2 * 8 of them
    bar = rect(100, 100, 140, 130)
    assert len(midline_samples(printed(bar, bias, shift), bar, SHAPE, 0)) == 0
    s = midline_samples(printed(bar, bias, shift), bar, SHAPE, 1)
    assert len(s) == 24 and np.allclose(s, shift[1], atol=0.01)


def test_line_end_pullback_and_corners_do_not_count():
    # Line ends pulled back by different amounts at the top and bottom: the v midline
    # of a vertical line would move by their difference; only long sides count.
    d = rect(100, 20, 130, 230)
    c = printed(rect(100, 31, 130, 226), 1.0, (0.0, 0.0), join=1)  # pullback 11 px top, 4 px bottom
    assert len(midline_samples(c, d, SHAPE, 1)) == 0
    s = midline_samples(c, d, SHAPE, 0)
    assert len(s) > 150 and np.allclose(s, 0.0, atol=0.005)  # rounded print corners: tiny asymmetry


def test_one_long_line_is_enough_few_samples_are_not_and_the_shift_is_limited():
    d = [rect(40, 20, 70, 230)]
    res = refine_offset([printed(d[0], 1.0, (0.5, 0.0))], d, SHAPE, ends=False)
    assert res.applied == (True, False) and res.n_features[0] == 1
    assert res.shift_px[0] == pytest.approx(0.5, abs=0.02) and res.shift_px[1] == 0.0
    short = [rect(40, 100, 50, 126)]  # 26 rows, 10 of them within 8 px of the corners: 10 samples
    r2 = refine_offset([printed(short[0], 1.0, (0.5, 0.0))], short, SHAPE, ends=False)
    assert r2.n_samples[0] == 10 and r2.applied == (False, False) and r2.shift_px == (0.0, 0.0)
    assert r2.measured_px[0] == pytest.approx(0.5, abs=0.02)
    assert refine_offset([printed(d[0], 1.0, (0.5, 0.0))], d, SHAPE, ends=False, min_features=2).applied[0] is False
    d2 = [rect(40, 20, 70, 230), rect(120, 20, 160, 230)]
    far = refine_offset([printed(x, 1.0, (3.5, 0.0)) for x in d2], d2, SHAPE, max_shift_px=2.0)
    assert far.applied[0] is False and far.measured_px[0] == pytest.approx(3.5, abs=0.02)


def test_border_crossings_and_far_contours_are_ignored():
    # A line cut by the left image border: its contour runs along u = 0 there.
    d = rect(-20, 20, 10, 230)
    c = np.clip(printed(d, 1.0, (0.0, 0.0)), 0, None)
    assert len(midline_samples(c, d, SHAPE, 0)) == 0
    # A contour of some other shape 10 px away from the design sides: not this feature's edges.
    d = rect(100, 20, 130, 230)
    assert len(midline_samples(printed(d, 10.0, (0, 0)), d, SHAPE, 0)) == 0



def test_sides_cut_by_the_frame_count_away_from_it():
    # Vertical lines drawn beyond the top and bottom of the image (the design as drawn, not
    # clipped to the frame): rows within clear_px (8) of the frame are left out, as a corner's
    # would be; the other 240 rows measure the shift.
    designs = [rect(40, -50, 70, 300), rect(120, -80, 160, 400)]
    contours = [np.clip(printed(d, 1.0, (0.3, 0.0)), 0, 256) for d in designs]  # closed along the frame
    s = midline_samples(contours[0], designs[0], SHAPE, 0)
    assert len(s) == 240 and np.allclose(s, 0.3, atol=1e-6)
    res = refine_offset(contours, designs, SHAPE)
    assert res.basis[0] == "sides" and res.shift_px[0] == pytest.approx(0.3, abs=1e-6)
    # clipped to the frame, 26 rows of a 30 px wide line are shorter than its width (a line end)
    cut = [rect(40, 230, 70, 256), rect(120, 230, 150, 256)]
    assert len(midline_samples(np.clip(printed(cut[0], 1.0, (0.3, 0.0)), 0, 256), cut[0], SHAPE, 0)) == 0
    drawn = [rect(40, 230, 70, 400), rect(120, 230, 150, 400)]
    assert len(midline_samples(np.clip(printed(drawn[0], 1.0, (0.3, 0.0)), 0, 256), drawn[0], SHAPE, 0)) == 26 - 16



def test_a_square_counts_whatever_the_rounding():
    # 40 x 40 px: its sides are exactly as long as its width, a tie that float rounding of the
    # pixel transform (1e-12 px) must not decide one way in one run and the other way in the next.
    counts = set()
    for eps in (-1e-12, 0.0, 1e-12):
        d = rect(100, 20, 140 + eps, 60 - eps)
        counts.add(len(midline_samples(printed(d, 1.0, (0.2, 0.0)), d, SHAPE, 0)))
    assert counts == {40 - 2 * 8}


def test_noisy_edges_pool_to_a_precise_shift():
    rng = np.random.default_rng(4)
    designs = [rect(20 + 45 * i, 20, 45 + 45 * i, 236) for i in range(5)]
    shift = (-0.42, 0.0)
    contours = []
    for d in designs:
        c = printed(d, 1.2, shift)
        nrm_noise = rng.normal(0, 0.4, len(c))  # uncorrelated position noise along u
        c[:, 0] += nrm_noise
        contours.append(c)
    res = refine_offset(contours, designs, SHAPE)
    assert res.applied[0] and res.shift_px[0] == pytest.approx(-0.42, abs=0.05)
    # v has no long-side evidence: the line ends see no gross disagreement, nothing applied
    assert res.basis == ("sides", "none") and res.shift_px[1] == 0.0
    assert res.measured_px[1] == pytest.approx(0.0, abs=0.1)


def test_along_line_axis_from_line_ends_facing_both_ways():
    # Horizontal lines only: u is constrained by line ends alone. Every end pulls back by
    # 5 px (and the sides grow by 1 px); lines cut by the left or right border show one end.
    # Ends facing left and right pull back alike, so their mean offset is the shift.
    shift = (3.1, 0.4)
    designs = [rect(30, 20, 200, 44), rect(-40, 70, 120, 94), rect(150, 70, 300, 94),
               rect(60, 130, 230, 154), rect(-30, 190, 90, 214)]
    contours = []
    for d in designs:
        pulled = d + np.array([[5, 0], [-5, 0], [-5, 0], [5, 0]])
        c = printed(pulled, 1.0, shift)
        contours.append(np.clip(c, 0, 256))
    res = refine_offset(contours, designs, SHAPE)
    assert res.basis == ("ends", "sides") and res.applied == (True, True)
    assert res.shift_px == pytest.approx(shift, abs=0.05)
    # Without the ends, u has no evidence; a small end-based shift is not applied.
    assert refine_offset(contours, designs, SHAPE, ends=False).applied == (False, True)
    small = [np.clip(printed(d + np.array([[5, 0], [-5, 0], [-5, 0], [5, 0]]), 1.0, (0.8, 0.4)), 0, 256)
             for d in designs]
    r2 = refine_offset(small, designs, SHAPE)
    assert r2.applied == (False, True) and r2.measured_px[0] == pytest.approx(0.8, abs=0.05)


def test_few_side_samples_correct_a_gross_disagreement_only():
    # Horizontal lines through the field (no u evidence) and squares drawn beyond the bottom
    # frame: 14 rows of each square's sides are clear of its corner and of the frame, fewer than
    # min_samples (30). The print sits 4 px right of the design (an appearance fit pulled by
    # line ends): the few samples correct it. A 1.5 px disagreement they leave alone.
    lines = [rect(0, 20, 256, 44), rect(0, 80, 256, 104), rect(0, 140, 256, 164)]
    squares = [rect(40, 226, 70, 260), rect(140, 226, 170, 260)]
    designs = lines + squares

    def run(shift, squares_in=2, **kw):
        ds = lines + squares[:squares_in]
        cs = [np.clip(printed(d, 1.0, shift), 0, 256) for d in ds]
        return refine_offset(cs, ds, SHAPE, **kw)

    res = run((4.0, 0.2))
    assert res.n_samples[0] == 28 and res.n_features[0] == 2
    assert res.basis == ("few sides", "sides") and res.applied == (True, True)
    assert res.shift_px == pytest.approx((4.0, 0.2), abs=0.02)
    assert run((4.0, 0.2), squares_in=1).basis[0] == "few sides"  # 14 samples of one square
    small = run((1.5, 0.2))
    assert small.basis[0] == "none" and small.shift_px[0] == 0.0
    assert small.measured_px[0] == pytest.approx(1.5, abs=0.02)
    off = run((4.0, 0.2), few_min_samples=30)  # the rule switched off: as before
    assert off.basis[0] == "none" and off.shift_px[0] == 0.0
    # noisy samples: the disagreement must also exceed few_k standard errors
    rng = np.random.default_rng(1)
    cs = [np.clip(printed(d, 1.0, (2.5, 0.0)), 0, 256) for d in designs]
    for c in cs[3:]:
        c[:, 0] += rng.normal(0, 1.5, len(c))
    noisy = refine_offset(cs, designs, SHAPE)
    assert noisy.basis[0] == "few sides" and noisy.sigma_px[0] > 0.2
    strict = refine_offset(cs, designs, SHAPE, few_k=abs(noisy.measured_px[0]) / noisy.sigma_px[0] + 0.5)
    assert strict.basis[0] == "none" and strict.shift_px[0] == 0.0


def test_line_ends_decide_when_long_sides_give_too_few_samples():
    # The ends case above plus one square cut by the bottom frame: 8 u samples from its sides,
    # too few to decide and below few_min_samples. Until the twenty-second round any side
    # sample at all kept the line ends out, and the appearance fit's 3 px error stayed.
    shift = (3.1, 0.4)
    designs = [rect(30, 20, 200, 44), rect(-40, 70, 120, 94), rect(150, 70, 300, 94),
               rect(60, 130, 230, 154), rect(-30, 190, 90, 214), rect(200, 232, 230, 262)]
    contours = []
    for d in designs[:5]:
        pulled = d + np.array([[5, 0], [-5, 0], [-5, 0], [5, 0]])
        contours.append(np.clip(printed(pulled, 1.0, shift), 0, 256))
    contours.append(np.clip(printed(designs[5], 1.0, shift), 0, 256))
    res = refine_offset(contours, designs, SHAPE)
    assert len(midline_samples(contours[5], designs[5], SHAPE, 0)) == 8
    assert res.basis == ("ends", "sides") and res.applied == (True, True)
    assert res.shift_px == pytest.approx(shift, abs=0.05)
    # ends that see no gross disagreement leave the few side samples reported
    small = [c - np.array([shift[0] - 0.8, 0.0]) for c in contours]
    r2 = refine_offset(small, designs, SHAPE)
    assert r2.basis[0] == "none" and r2.n_samples[0] == 8


def test_design_evidence_names_what_fixes_each_axis():
    from segsem_cli.edge_align import design_evidence

    h, w = SHAPE
    crossing = [rect(40, 0, 70, h), rect(120, 0, 160, h)]            # vertical lines through the field
    assert design_evidence(crossing, SHAPE) == ("sides", "none")      # nothing fixes v
    top_ends = [rect(40, 60, 70, h), rect(120, 60, 160, h)]          # their upper ends in view
    assert design_evidence(top_ends, SHAPE) == ("sides", "one-sided")  # pullback shifts v
    both_ends = [rect(40, 60, 70, 200), rect(120, 60, 160, 200)]     # whole lines in view
    assert design_evidence(both_ends, SHAPE) == ("sides", "ends")      # pullback cancels
    bars = both_ends + [rect(180, 40, 250, 60)]                       # a horizontal bar's long sides
    assert design_evidence(bars, SHAPE) == ("sides", "sides")
    assert design_evidence([], SHAPE) == ("none", "none")
    rows = [rect(0, 40, w, 70)]                                       # one horizontal line through the field
    assert design_evidence(rows, SHAPE) == ("none", "sides")


def test_search_range_is_physical_by_default():
    from segsem_cli.align import search_range_px

    assert search_range_px(None, 1.0) == 40.0
    assert search_range_px(None, 0.5) == 80.0   # 40 nm of stage error is 80 px at 0.5 nm/px
    assert search_range_px(None, 2.0) == 40.0   # never fewer than 40 px
    assert search_range_px(25.0, 0.5) == 25.0   # an explicit --search-px wins
