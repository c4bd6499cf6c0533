"""Sub-pixel alignment refinement from the extracted edges (bias-free midlines).

The image-to-layout alignment (:mod:`segsem_cli.align`) matches an appearance
model of the whole clip. Once contours are extracted, the offset can be
measured more directly: across a straight feature (the long sides of a line,
a bar, a space), the printed width differs from the design by the process
bias, but the bias moves both sides by the same amount in opposite
directions, so the **midpoint between the two printed edges** sits on the
**midpoint between the two design edges** whatever the bias. Their
difference, pooled over every such cross-section of every feature, is the
residual misalignment.

Cross-sections, per axis (``u``: along image rows; ``v``: along columns):

* scan lines through pixel centres (``v = r + 0.5`` for the ``u`` offset);
* the design polygon crosses the scan line exactly twice, both times on a
  side at least ``clear_px`` (8 px) away along the side from its ends
  (corner rounding and line-end pullback never count), and both sides are
  at least as long as the width between them (``MIDLINE_ASPECT``: the long
  sides of a line or bar and the sides of a square or pad, not line ends);
* the scan line is at least ``clear_px`` from the image frame. ``segsem
  extract`` passes the design as drawn beyond the frame
  (:func:`segsem_cli.layout.context_pixels`): clipped to the frame, a line
  the frame cuts would have sides that end there, too short to count;
* the extracted contour crosses the same scan line exactly twice, each
  within ``max_dev_px`` of the design side, neither on the image border.

The offset is the median of the cross-section samples; it is applied only
when each axis has at least ``min_samples`` samples (from at least
``min_features`` features, one by default: a single long line fixes its
axis better than the appearance fit does) and it is within
``max_shift_px`` (a small correction, not a new search). Fewer samples
(``few_min_samples`` or more) are applied only when they disagree with the
appearance alignment grossly (``basis`` = ``few sides``); an axis short of
``min_samples`` is otherwise measured on line ends facing both ways
(``basis`` = ``ends``, see :func:`refine_offset`). Otherwise that axis keeps
the appearance alignment.

Assumption (documented, configurable with ``--no-edge-align``): the two
sides of a straight feature print and image symmetrically. A detector that
makes one side of every line brighter than the other shifts the midline;
the appearance alignment would be biased the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .contours import concat_rings


@dataclass(frozen=True)
class EdgeAlignResult:
    """Residual misalignment measured from extracted edges.

    ``shift_px`` is the ``(du, dv)`` by which the printed content sits away
    from where the current transform puts the design (apply it by moving the
    design by ``shift_px``). ``applied`` tells, per axis, whether the axis
    had enough evidence; ``measured_px`` is the median found (applied or not); ``sigma_px`` is a robust standard error (``nan``
    without samples); ``n_samples`` and ``n_features`` count the evidence.
    """

    shift_px: tuple[float, float]
    applied: tuple[bool, bool]
    measured_px: tuple[float, float]
    n_samples: tuple[int, int]
    n_features: tuple[int, int]
    sigma_px: tuple[float, float]
    samples: tuple[np.ndarray, np.ndarray] = field(repr=False, default=(np.zeros(0), np.zeros(0)))
    basis: tuple[str, str] = ("none", "none")

    def to_json(self) -> dict:
        return {
            "shift_px": [round(float(s), 4) for s in self.shift_px],
            "applied": [bool(a) for a in self.applied],
            "measured_px": [round(float(s), 4) for s in self.measured_px],
            "basis": list(self.basis),
            "n_samples": [int(n) for n in self.n_samples],
            "n_features": [int(n) for n in self.n_features],
            "sigma_px": [None if not np.isfinite(s) else round(float(s), 4) for s in self.sigma_px],
        }


#: Cross-sections count where both design sides are at least this many times as long as the width
#: between them: the long sides of lines and bars, and the sides of squares and pads, whose bias,
#: corner rounding and roughness are as symmetric as a line's; not line ends (short sides of
#: elongated features), which print pulled back. 2.0 until the twentieth round: squares and pads
#: were left out, and an axis fixed by a single line kept that line's roughness (x off by 1.09 px
#: on one second-model hard image where one line fixed x; with its squares, 18 features: 0.40 px).
MIDLINE_ASPECT = 1.0

_LINE_OFF = 1 << 30  # keys: feature index * 2^32 + (scan line + 2^30)
#: Slack (px) of the geometric tests: designs drawn on a grid tie them exactly (a square's sides are
#: exactly as long as it is wide), and the pixel transform's rounding must not decide such ties.
_TIE = 1e-6


def _crossings(pts: np.ndarray, nxt: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`scan_crossings` of concatenated polygons: ``(line, position, side index)``."""
    if len(pts) == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    a0, a1 = pts[:, 1 - axis], pts[nxt, 1 - axis]  # coordinate across the scan lines
    b0, b1 = pts[:, axis], pts[nxt, axis]          # coordinate along them
    k0 = np.ceil(np.minimum(a0, a1) - 0.5).astype(np.int64)
    k1 = np.ceil(np.maximum(a0, a1) - 0.5).astype(np.int64)  # exclusive
    cnt = np.where(a1 != a0, np.maximum(k1 - k0, 0), 0)
    total = int(cnt.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    seg = np.repeat(np.arange(len(pts)), cnt)
    first = np.repeat(np.cumsum(cnt) - cnt, cnt)
    line = np.repeat(k0, cnt) + (np.arange(total) - first)
    t = (line + 0.5 - a0[seg]) / (a1[seg] - a0[seg])
    pos = b0[seg] + t * (b1[seg] - b0[seg])
    return line, pos, seg


def scan_crossings(poly: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a closed polygon crosses the scan lines through pixel centres.

    Parameters
    ----------
    poly : ``(N, 2)`` closed polygon ``(u, v)`` px (no repeated last vertex).
    axis : 0 to scan rows (lines ``v = r + 0.5``, positions are ``u``),
        1 to scan columns (lines ``u = c + 0.5``, positions are ``v``).

    Returns
    -------
    (line, position, segment) : integer scan-line index ``r`` (or ``c``), the
    crossing coordinate along it, and the index ``i`` of the polygon side
    ``poly[i] -> poly[i + 1]`` crossed. Sides are half-open, so a vertex on a
    scan line is counted once.
    """
    pts, nxt, _ = concat_rings([poly])
    return _crossings(pts, nxt, axis)


def _pairs(key: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keys (scan lines) crossed exactly twice: ``(key, low, high, i_low, i_high)`` (indices into the inputs)."""
    if len(key) == 0:
        e = np.zeros(0, np.int64)
        return e, np.zeros(0), np.zeros(0), e, e
    order = np.lexsort((pos, key))
    uniq, start, count = np.unique(key[order], return_index=True, return_counts=True)
    two = count == 2
    i = order[start[two]]
    j = order[start[two] + 1]
    return uniq[two], pos[i], pos[j], i, j


class _Scan:
    """Crossings of many polygons with the scan lines of one axis, keyed by (polygon, line)."""

    def __init__(self, polys: Sequence[np.ndarray | None], axis: int):
        pts, nxt, fid = concat_rings(polys)
        line, self.pos, seg = _crossings(pts, nxt, axis)
        self.key = fid[seg] * (1 << 32) + (line + _LINE_OFF)
        d = pts[nxt[seg]] - pts[seg]
        self.side_len = np.hypot(d[:, 0], d[:, 1])
        a0 = pts[seg, 1 - axis]
        self.t = (line + 0.5 - a0) / d[:, 1 - axis] if len(seg) else np.zeros(0)


def _midlines(contours, designs, shape, axis, *, clear_px, max_dev_px, border_px, aspect=MIDLINE_ASPECT):
    """Midline samples of all features at once: ``(values, feature index)``.

    ``contours`` may be ``designs`` itself (:func:`design_evidence`): its crossings are then taken once."""
    D = _Scan(designs, axis)
    C = D if contours is designs else _Scan(contours, axis)
    k, lo, hi, i, j = _pairs(D.key, D.pos)
    kc, clo, chi, _, _ = (k, lo, hi, i, j) if C is D else _pairs(C.key, C.pos)
    common, a_, b_ = np.intersect1d(k, kc, assume_unique=True, return_indices=True)
    if len(common) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    lo, hi, i, j, clo, chi = lo[a_], hi[a_], i[a_], j[a_], clo[b_], chi[b_]
    along_i = np.minimum(D.t[i], 1.0 - D.t[i]) * D.side_len[i]
    along_j = np.minimum(D.t[j], 1.0 - D.t[j]) * D.side_len[j]
    extent = shape[1] if axis == 0 else shape[0]
    across = shape[0] if axis == 0 else shape[1]
    mid = ((common & 0xFFFFFFFF) - _LINE_OFF) + 0.5  # the scan line's coordinate across the lines
    ok = ((along_i >= clear_px - _TIE) & (along_j >= clear_px - _TIE) & (mid >= clear_px) & (mid <= across - clear_px)
          & (np.minimum(D.side_len[i], D.side_len[j]) >= aspect * (hi - lo) - _TIE)
          & (np.abs(clo - lo) <= max_dev_px) & (np.abs(chi - hi) <= max_dev_px)
          & (clo >= border_px) & (chi <= extent - border_px))
    return (0.5 * ((clo + chi) - (lo + hi)))[ok], (common[ok] >> 32)


def _ends(contours, designs, shape, axis, *, max_dev_px, border_px, aspect=2.0):
    """Line-end samples of all features at once: ``(values, facing, feature index)``."""
    D = _Scan(designs, axis)
    C = D if contours is designs else _Scan(contours, axis)
    k, lo, hi, i, j = _pairs(D.key, D.pos)
    empty = (np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    if len(k) == 0 or len(C.key) == 0:
        return empty
    width = hi - lo
    kk = np.concatenate([k, k])
    dpos = np.concatenate([lo, hi])
    idx = np.concatenate([i, j])
    face = np.concatenate([-np.ones(len(k)), np.ones(len(k))])
    t = D.t[idx]
    short = ((D.side_len[idx] * aspect <= np.concatenate([width, width]) + _TIE)
             & (t >= 1.0 / 3.0 - _TIE) & (t <= 2.0 / 3.0 + _TIE))
    kk, dpos, face = kk[short], dpos[short], face[short]
    if len(kk) == 0:
        return empty
    order = np.lexsort((C.pos, C.key))
    ck, cp = C.key[order], C.pos[order]
    lo_i = np.searchsorted(ck, kk, side="left")
    hi_i = np.searchsorted(ck, kk, side="right")
    best = np.full(len(kk), np.inf)
    val = np.zeros(len(kk))
    # the contour crossings of one scan line are sorted by position: the nearest is next to
    # the design position's insertion point within the line's block
    ins = lo_i + np.array([np.searchsorted(cp[a:b], x) for a, b, x in zip(lo_i, hi_i, dpos)], dtype=np.int64)
    for q in (ins - 1, ins):
        okq = (q >= lo_i) & (q < hi_i)
        qc = np.clip(q, 0, len(cp) - 1)
        dist = np.where(okq, np.abs(cp[qc] - dpos), np.inf)
        better = dist < best
        best = np.where(better, dist, best)
        val = np.where(better, cp[qc], val)
    extent = shape[1] if axis == 0 else shape[0]
    ok = (best <= max_dev_px) & (val >= border_px) & (val <= extent - border_px)
    return (val - dpos)[ok], face[ok], (kk[ok] >> 32)


def midline_samples(contour: np.ndarray, design: np.ndarray, shape: tuple[int, int], axis: int, *,
                    clear_px: float = 8.0, max_dev_px: float = 6.0, border_px: float = 2.0,
                    aspect: float = MIDLINE_ASPECT) -> np.ndarray:
    """Midline offsets (printed minus design, px along ``axis``) of one feature; see the module docs."""
    return _midlines([contour], [design], shape, axis, clear_px=clear_px, max_dev_px=max_dev_px,
                     border_px=border_px, aspect=aspect)[0]


def end_samples(contour: np.ndarray, design: np.ndarray, shape: tuple[int, int], axis: int, *,
                max_dev_px: float = 12.0, border_px: float = 2.0, aspect: float = 2.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Printed-minus-design positions (px along ``axis``) at the middle of the feature's short sides.

    A short side (a line end) is crossed by scan lines along the line; only
    crossings in the middle third of the side count (the rounded tip), each
    matched to the contour crossing nearest to it on the same scan line
    (within ``max_dev_px``, off the image border). Returns the differences and
    the side's facing (+1: the design crossing is the pair's upper one, e.g.
    a right end; -1: the lower one).
    """
    v, f, _ = _ends([contour], [design], shape, axis, max_dev_px=max_dev_px, border_px=border_px, aspect=aspect)
    return v, f


def design_evidence(designs: Sequence[np.ndarray], shape: tuple[int, int], *, clear_px: float = 8.0,
                    border_px: float = 2.0, min_samples: int = 30, min_end_samples: int = 8) -> tuple[str, str]:
    """What in the design itself can fix the offset along each axis ``(u, v)``.

    ``"sides"``: straight feature sides cross that axis (bias-free midlines,
    :func:`refine_offset`); ``"ends"``: only line ends, facing both ways (their
    pullback cancels); ``"one-sided"``: only line ends (or corners) facing one way,
    so the printed pullback shifts any estimate along that axis by up to the
    pullback length; ``"none"``: nothing (the pattern is invariant along it).
    Computed from the design polygons alone (each taken as its own print).
    """
    ds = [np.asarray(d, dtype=np.float64) for d in designs if d is not None and len(d) >= 3]
    out = []
    for axis in (0, 1):
        v, _ = _midlines(ds, ds, shape, axis, clear_px=clear_px, max_dev_px=0.5, border_px=border_px)
        if len(v) >= min_samples:
            out.append("sides")
            continue
        _, face, _ = _ends(ds, ds, shape, axis, max_dev_px=0.5, border_px=border_px)
        n_plus, n_minus = int((face > 0).sum()), int((face < 0).sum())
        if min(n_plus, n_minus) >= min_end_samples:
            out.append("ends")
        elif max(n_plus, n_minus) > 0:
            out.append("one-sided")
        else:
            out.append("none")
    return out[0], out[1]


def refine_offset(contours: Sequence[np.ndarray | None], designs: Sequence[np.ndarray], shape: tuple[int, int], *,
                  clear_px: float = 8.0, max_dev_px: float = 6.0, border_px: float = 2.0,
                  min_samples: int = 30, min_features: int = 1, max_shift_px: float = 6.0,
                  corr_px: float = 10.0, aspect: float = MIDLINE_ASPECT, ends: bool = True, end_max_dev_px: float = 12.0,
                  min_end_samples: int = 8, end_min_shift_px: float = 1.5, few_min_samples: int = 10,
                  few_min_shift_px: float = 2.0, few_k: float = 4.0) -> EdgeAlignResult:
    """Residual ``(du, dv)`` of the printed content from the design, from extracted contours.

    Parameters
    ----------
    contours : per feature, the extracted closed contour ``(N, 2)`` (u, v) px, or None.
    designs : per feature, the design polygon in the same pixel frame.
    shape : image ``(H, W)``.
    clear_px, max_dev_px, border_px, aspect : cross-section rules (module docs).
    min_samples, min_features : evidence needed per axis.
    max_shift_px : larger corrections are not applied (the appearance
        alignment stands; the result still reports them). 6 px, the most
        ``max_dev_px`` lets the long sides measure (5 until the twenty-second
        round, which left a 5.5 px line-end bias of a 0.75 nm/px image in place).
    ends, end_max_dev_px, min_end_samples : an axis with fewer than
        ``min_samples`` long-side samples that the ``few_*`` rule below does not
        decide (e.g. the along-line axis of a field of horizontal lines,
        where the appearance alignment leans on line ends cut by the border) is
        measured on line ends instead (:func:`end_samples`): ends facing +
        and ends facing - pull back alike, so the mean of their two median
        offsets is the shift; needs ``min_end_samples`` of each facing. Pullback
        differs between free ends and ends facing a neighbour (up to ~1 px on
        the synth benchmark), so this estimate is coarse: it corrects the
        appearance alignment only when it disagrees by at least
        ``end_min_shift_px`` (a gross bias, e.g. 4 px from line ends cut by the
        border), and it is never used where enough long-side samples exist.
    few_min_samples, few_min_shift_px, few_k : an axis with fewer than
        ``min_samples`` but at least ``few_min_samples`` long-side samples (a
        row of squares cut by the image border, the few rows of a line's side
        in view) is corrected by them only when they disagree with the
        appearance alignment grossly: by at least ``few_min_shift_px`` and
        ``few_k`` standard errors (``basis`` = ``few sides``). That is the
        signature of an appearance fit pulled by line ends (their pullback,
        4-5 px on the synth images), which roughness on a few samples does
        not reach; smaller disagreements keep the appearance alignment.
    corr_px : correlation length of neighbouring cross-sections (edge
        roughness), for the standard error only.
    """
    if len(contours) != len(designs):
        raise ValueError(f"refine_offset: {len(contours)} contours for {len(designs)} designs")
    shift, applied, meas, ns, nf, sig, samples, basis = [], [], [], [], [], [], [], []
    cs = [c if (c is not None and d is not None and len(c) >= 3 and len(d) >= 3) else None
          for c, d in zip(contours, designs)]
    ds = [d if c is not None else None for c, d in zip(cs, designs)]
    for axis in (0, 1):
        allv, fids = _midlines(cs, ds, shape, axis, clear_px=clear_px, max_dev_px=max_dev_px, border_px=border_px,
                               aspect=aspect)
        n = len(allv)
        n_feat = len(np.unique(fids))
        if n:
            med = float(np.median(allv))
            mad = 1.4826 * float(np.median(np.abs(allv - med)))
            se = mad / np.sqrt(max(n / max(corr_px, 1.0), 1.0))
        else:
            med, se = 0.0, float("nan")
        ok = n >= min_samples and n_feat >= min_features and abs(med) <= max_shift_px
        how = "sides" if ok else "none"
        if not ok and few_min_samples <= n < min_samples and n_feat >= min_features \
                and max(few_min_shift_px, few_k * se) <= abs(med) <= max_shift_px:
            ok, how = True, "few sides"
        if not ok and n < min_samples and ends:
            ev_, ef_, efid = _ends(cs, ds, shape, axis, max_dev_px=end_max_dev_px, border_px=border_px)
            plus, minus = ev_[ef_ > 0], ev_[ef_ < 0]
            if min(len(plus), len(minus)) >= min_end_samples:
                med_e = 0.5 * (float(np.median(plus)) + float(np.median(minus)))
                ok = end_min_shift_px <= abs(med_e) <= max_shift_px
                if ok or n == 0:  # reported instead of the few side samples only when it decides
                    med = med_e
                    allv = np.concatenate([plus - float(np.median(plus)), minus - float(np.median(minus))]) + med
                    n = len(allv)
                    n_feat = len(np.unique(efid))
                    se = 1.4826 * float(np.median(np.abs(allv - med))) / np.sqrt(max(n / 2.0, 1.0))
                if ok:
                    how = "ends"
        basis.append(how)
        shift.append(med if ok else 0.0)
        applied.append(ok)
        meas.append(med)
        ns.append(n)
        nf.append(n_feat)
        sig.append(se)
        samples.append(allv)
    return EdgeAlignResult(tuple(shift), tuple(applied), tuple(meas), tuple(ns), tuple(nf), tuple(sig), tuple(samples),
                           tuple(basis))


__all__ = ["MIDLINE_ASPECT", "EdgeAlignResult", "design_evidence", "end_samples", "midline_samples", "refine_offset", "scan_crossings"]
