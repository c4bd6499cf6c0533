"""Fast re-implementations give the same results as the straightforward code they replace."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import find_contours

from segsem_cli.contours import coarse_contours
from segsem_cli.edges import gaussian_smooth

from segsem_plugins.threshold import _coarse_contours, iso_lines


def _same_contours(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(6))
def test_iso_lines_equal_skimage_find_contours(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(2, 60, 2))
    img = rng.standard_normal(shape)
    if seed % 2:
        img = gaussian_smooth(img.astype(np.float32), 1.5)  # float32 input, smooth closed and open lines
    for level in (0.0, 0.3, float(np.median(img))):
        want = find_contours(img, level)
        got = iso_lines(img, level)
        assert _same_contours(want, got)
    assert len(find_contours(img, 0.0)) >= 1


def test_iso_lines_saddles_closed_and_open_order():
    # a checkerboard is all saddles; a bright disc gives a closed contour, a bright band open ones
    img = np.zeros((40, 50))
    img[5:15, 5:15] = np.indices((10, 10)).sum(axis=0) % 2
    v, u = np.mgrid[0:40, 0:50]
    img += np.hypot(u - 35, v - 25) < 6
    img[:, 45:48] = 1.0
    want = find_contours(img, 0.5)
    got = iso_lines(img, 0.5)
    assert _same_contours(want, got)
    closed = [c for c in got if np.array_equal(c[0], c[-1])]
    assert len(closed) >= 2 and len(got) > len(closed)


def test_iso_lines_level_on_pixel_values_and_integer_images():
    # pixels exactly at the level put crossings on grid vertices (handled by skimage)
    img = np.round(np.random.default_rng(3).standard_normal((30, 30)) * 2) / 2
    assert _same_contours(find_contours(img, 0.5), iso_lines(img, 0.5))
    ints = (np.random.default_rng(4).random((20, 20)) * 4).astype(np.uint8)
    assert _same_contours(find_contours(ints, 1.5), iso_lines(ints, 1.5))
    assert iso_lines(np.zeros((5, 5)), 0.5) == []


def test_coarse_contours_fast_equal_reference():
    rng = np.random.default_rng(5)
    img = gaussian_smooth(rng.standard_normal((120, 140)).astype(np.float32), 2.5)
    level = float(np.percentile(img, 60))
    want = coarse_contours(img, level, min_area=4.0)
    got = _coarse_contours(img, level, min_area=4.0)
    assert len(want) == len(got) > 3
    for a, b in zip(want, got):
        assert a.closed == b.closed and a.area == b.area and np.array_equal(a.points, b.points)


# ----------------------------------------------------------------------------- contour CSV

def _csv_reference(records, decimals):
    """The contour CSV as the row-by-row writer made it (one formatted value at a time)."""
    import csv
    import io

    from segsem_cli.contour_io import CSV_COLUMNS, _fmt
    from segsem_cli.geometry import as_ring, orient_ring

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(CSV_COLUMNS)
    for rec in records:
        rings = [orient_ring(as_ring(rec.xy_nm), ccw=True)] + [orient_ring(as_ring(h), ccw=False) for h in rec.holes_nm]
        head = io.StringIO()
        csv.writer(head, lineterminator="").writerow([rec.image, rec.feature_id, rec.source,
                                                      _fmt(rec.confidence, decimals)])
        for ring_no, ring in enumerate(rings):
            buf.writelines(f"{head.getvalue()},{ring_no},{k},{_fmt(x, decimals)},{_fmt(y, decimals)}\n"
                           for k, (x, y) in enumerate(ring.tolist()))
    return buf.getvalue()


def test_contour_csv_text_equals_value_by_value_formatting():
    from segsem_cli.contour_io import contour_csv_text
    from segsem_cli.types import ContourRecord

    rng = np.random.default_rng(0)
    recs = []
    for i in range(12):
        n = int(rng.integers(3, 60))
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        xy = np.column_stack([np.cos(t), np.sin(t)]) * rng.uniform(1, 50) + rng.uniform(-100, 100, 2)
        # values that print as "-0.0000" (must lose the sign), true negatives and signed zeros
        xy[::4, 0] = rng.choice([-0.00004, -0.00005, -0.00006, -0.0, 0.0, -0.000049999, -1e-12, -0.4], size=len(xy[::4]))
        holes = (0.3 * xy[::2] + 0.7 * xy.mean(axis=0),) if i % 3 == 0 and n > 12 else ()
        recs.append(ContourRecord(f"img%{i % 3}", f'p,{i}"q', xy, "threshold", float(rng.random()), holes_nm=holes))
    for decimals in (0, 1, 4, 6):
        text = contour_csv_text(recs, decimals=decimals)
        assert text == _csv_reference(recs, decimals)
    assert ",-0.0000" not in contour_csv_text(recs) and ",-0.4000" in contour_csv_text(recs)


# ----------------------------------------------------------------------------- gauges

def _gauge_rows_reference(gauges, per_image, fovs):
    """gauge_rows as a plain loop: each cutline against each field of view, all edges of the image."""
    import math

    from shapely.geometry import LineString, Point

    from segsem_cli.gauges import measure_cd

    rows = []
    for g in gauges:
        row = {"name": g.name, "x1": g.x1, "y1": g.y1, "x2": g.x2, "y2": g.y2, **g.extra}
        line, mid = LineString([(g.x1, g.y1), (g.x2, g.y2)]), Point(*g.midpoint)
        best, best_d = None, math.inf
        for n, p in fovs.items():
            if p.covers(line) and p.centroid.distance(mid) < best_d:
                best, best_d = n, p.centroid.distance(mid)
        if best is None:
            row.update(wafer_cd_nm="", image="", source="", confidence="", status="outside_images")
        else:
            recs = list(per_image.get(best, ()))
            res = measure_cd(g.p1, g.p2, recs)
            crossed = [recs[i] for i in res.features]
            row.update(wafer_cd_nm=res.cd_nm if res.cd_nm is not None else "", image=best,
                       source="+".join(sorted({r.source for r in crossed})),
                       confidence=min(float(r.confidence) for r in crossed) if crossed else "", status=res.status)
        rows.append(row)
    return rows


def test_gauge_rows_equal_plain_loop():
    from shapely.geometry import box

    from segsem_cli.gauges import Gauge, gauge_rows
    from segsem_cli.types import ContourRecord

    rng = np.random.default_rng(2)
    fovs = {"a": box(0, 0, 100, 100), "b": box(60, 0, 160, 100), "c": box(0, 0, 100, 100)}  # c duplicates a
    per_image = {}
    for name, (x0, x1) in (("a", (0, 100)), ("b", (60, 160)), ("c", (0, 100))):
        recs = []
        for j in range(8):
            cx, cy, r = rng.uniform(x0 + 10, x1 - 10), rng.uniform(10, 90), rng.uniform(3, 9)
            t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            ring = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])
            recs.append(ContourRecord(name, f"f{j}", ring, "threshold" if j % 2 else "sam2", float(rng.random())))
        per_image[name] = recs
    gauges = []
    for k in range(60):
        rec = per_image["ab"[k % 2]][k % 8]
        c = rec.xy_nm.mean(axis=0)
        dx = rng.uniform(5, 30)
        gauges.append(Gauge(f"g{k}", c[0] - dx, c[1] + rng.uniform(-3, 3), c[0] + dx, c[1], {"kind": "x"}))
    gauges.append(Gauge("outside", 500.0, 500.0, 520.0, 500.0))
    gauges.append(Gauge("through_vertex", *per_image["a"][0].xy_nm[0], *(per_image["a"][0].xy_nm[0] + [30.0, 0.0])))
    got = gauge_rows(gauges, per_image, fovs)
    assert got == _gauge_rows_reference(gauges, per_image, fovs)
    assert {r["status"] for r in got} >= {"ok", "outside_images"}
    assert gauge_rows(gauges, per_image, {})[0]["status"] == "outside_images"


# ----------------------------------------------------------------------------- edge refinement internals

def test_noise_median_by_counting_equals_np_median():
    from segsem_cli.edges import _median

    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 11, 1001, 4096):
        for scale in (1, 255, 40000):
            x = np.rint(rng.standard_normal(n) * scale).astype(np.float32)
            for y in (x, x - np.float32(0.5), np.abs(x - np.median(x)), x + np.float32(0.1), x.astype(np.float64)):
                want, got = np.median(y), _median(y)
                assert want == got and type(want) is type(got)


def test_along_mean_box_filter_equals_cumulative_sums():
    from segsem_cli.edges import _along_mean

    rng = np.random.default_rng(8)
    counts = np.array([5, 40, 3, 17])
    a = rng.standard_normal((counts.sum(), 9)).astype(np.float32) * 100
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for window in (1, 3, 9):
        got = _along_mean(a, counts, window)
        h = window // 2
        want = np.empty_like(a)
        for s, n in zip(starts, counts):  # circular mean within each contour, float64 sums
            idx = s + (np.arange(n)[:, None] + np.arange(-h, h + 1)[None, :]) % n
            want[s:s + n] = (a[idx].astype(np.float64).sum(axis=1) / window).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-5)
        assert got.dtype == np.float32


def _locate_reference(q, qw, *, edge, threshold, centre_weight, noise_w=0.0, base_band=0.05):
    """_locate as first written (whole-array accumulate / where), for the threshold rule; the rim
    level's run around the peak (twentieth round) walked out sample by sample."""
    from segsem_cli.edges import PEAK_NOISE_K, PEAK_RUN

    m_, k_ = q.shape
    idx = np.arange(k_)
    cm = np.minimum.accumulate(qw, axis=1)
    rise = qw - cm
    centre = (k_ - 1) / 2.0
    wgt = 1.0 - centre_weight * ((idx - centre) / max(centre, 1.0)) ** 2
    lm = np.ones_like(qw, dtype=bool)
    lm[:, 1:] &= qw[:, 1:] >= qw[:, :-1]
    lm[:, :-1] &= qw[:, :-1] >= qw[:, 1:]
    k = np.argmax(np.where(lm, rise * wgt[None, :], -np.inf), axis=1)
    rows = np.arange(m_)
    peak = qw[rows, k]
    before = idx[None, :] <= k[:, None]
    m = np.argmin(np.where(before, qw, np.inf), axis=1)
    lowest = qw[rows, m]
    band = np.maximum(base_band * (peak - lowest), 3.0 * noise_w)
    floor = before & (qw <= (lowest + band)[:, None])
    qmin = np.sum(np.where(floor, qw, 0.0), axis=1) / np.maximum(floor.sum(axis=1), 1)
    if noise_w > 0:  # rim level: mean of the contiguous run around the peak within K * noise_w of it
        cap = np.zeros(qw.shape, dtype=bool)
        for r in range(m_):
            lo_r = hi_r = k[r]
            while lo_r > max(0, k[r] - PEAK_RUN) and qw[r, lo_r - 1] >= peak[r] - PEAK_NOISE_K * noise_w:
                lo_r -= 1
            while hi_r < min(k_ - 1, k[r] + PEAK_RUN) and qw[r, hi_r + 1] >= peak[r] - PEAK_NOISE_K * noise_w:
                hi_r += 1
            cap[r, lo_r:hi_r + 1] = True
        peak = np.sum(np.where(cap, qw, 0.0), axis=1) / np.count_nonzero(cap, axis=1)
    contrast = peak - qmin
    found = (k > m) & (contrast > 0)
    level = qmin + threshold * contrast
    cand = (idx[None, :] >= m[:, None]) & (idx[None, :] < k[:, None]) & (q < level[:, None])
    has = cand.any(axis=1)
    j = np.clip(k_ - 1 - np.argmax(cand[:, ::-1], axis=1), 0, k_ - 2)
    q0, q1 = q[rows, j], q[rows, j + 1]
    den = q1 - q0
    frac = np.where(den > 0, (level - q0) / np.where(den > 0, den, 1.0), 0.5)
    x = j + np.clip(frac, 0.0, 1.0)
    lo = np.max(np.where(floor, idx[None, :], 0), axis=1)
    return x, found & has, contrast, lo, k


def test_locate_equals_reference():
    from segsem_cli.edges import _locate

    rng = np.random.default_rng(9)
    t = np.linspace(-6, 6, 49)
    # rim profiles (substrate -> resist) with noise, shifted rims, flat and quantised rows
    base = 1.0 / (1.0 + np.exp(-3.0 * (t[None, :] - rng.uniform(-3, 3, (300, 1))))) + 0.8 * np.exp(-(t[None, :] - 1.0) ** 2)
    qw = (base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)
    q = (qw + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)
    qw[:10] = 0.5
    q[10:20] = np.round(q[10:20], 1)
    for nw in (0.0, 0.02):
        got = _locate(q, qw, edge="threshold", threshold=0.4, centre_weight=0.3, noise_w=nw)
        want = _locate_reference(q, qw, edge="threshold", threshold=0.4, centre_weight=0.3, noise_w=nw)
        for g, w in zip(got, want):
            assert np.array_equal(g, w, equal_nan=True) and g.dtype == w.dtype
        assert got[1].sum() > 200


def test_shared_samples_equal_separate_sampling():
    from segsem_cli.edges import _profile_offsets, _sample_along, _shared_samples

    rng = np.random.default_rng(10)
    img = gaussian_smooth(rng.standard_normal((80, 90)).astype(np.float32), 2.0)
    pts = rng.uniform(5, 75, (300, 2))
    ang = rng.uniform(0, 2 * np.pi, 300)
    nrm = np.column_stack([np.cos(ang), np.sin(ang)])
    main = _profile_offsets(6.0, 0.25, 1.0)[0]
    other = _profile_offsets(12.0, 0.5, 1.0)[0]
    a, b = _shared_samples(img, pts, nrm, main, other)
    assert np.array_equal(a, _sample_along(img, pts, nrm, main))
    assert np.array_equal(b, _sample_along(img, pts, nrm, other))
    # bilinear samples at (u, v) = pixel centres are the pixels themselves
    centre = np.array([[10.5, 20.5]])
    s = _sample_along(img, centre, np.array([[1.0, 0.0]]), np.array([0.0, 1.0]))
    assert s[0, 0] == img[20, 10] and s[0, 1] == img[20, 11]


# ----------------------------------------------------------------------------- per-image record JSON

def test_record_json_same_values_as_json_dumps():
    import json

    from segsem_cli.atomic import json_default
    from segsem_cli.pipeline import record_json

    rng = np.random.default_rng(11)
    ext = np.round(rng.uniform(-5000, 5000, (300, 2)), 4)
    ext[:4] = [[-0.0, 0.0], [12.0, -3.5], [0.0001, -0.0001], [123456.789, 1e-5]]
    rec = {"image": "img\x00vertices", "center_nm": [1.0, 2.0], "features": [
        {"feature_id": "a", "status": "ok", "confidence": np.float32(0.5), "exterior_nm": ext,
         "holes_nm": [np.round(ext[::3] * 0.1, 4), np.zeros((0, 2))]},
        {"feature_id": "b", "status": "not_found"},
        {"feature_id": "c", "exterior_nm": ext[:5].tolist(), "holes_nm": []}],
        "timings": {"read": 0.1}}
    text = record_json(rec)
    assert text.endswith("\n") and "\n" not in text[:-1]
    assert json.loads(text) == json.loads(json.dumps(rec, default=json_default))
    assert "-0.0000" in text or "-0.0" in text  # the sign of zero survives
    # a string holding the placeholder itself: encoded plainly, same values
    rec["image"] = "\x00vertices\x00"
    assert json.loads(record_json(rec)) == json.loads(json.dumps(rec, default=json_default))
