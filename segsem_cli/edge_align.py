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
  at least twice as long as the width between them (the long sides of a
  line, not its ends);
* the extracted contour crosses the same scan line exactly twice, each
  within ``max_dev_px`` of the design side, neither on the image border.

The offset is the median of the cross-section samples; it is applied only
when each axis has at least ``min_samples`` samples from at least two
features and it is within ``max_shift_px`` (a small correction, not a new
search). Otherwise that axis keeps the appearance alignment.

Assumption (documented, configurable with ``--no-edge-align``): the two
sides of a straight feature print and image symmetrically. A detector that
makes one side of every line brighter than the other shifts the midline;
the appearance alignment would be biased the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


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
    p = np.asarray(poly, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    a = p[:, 1 - axis]  # coordinate across the scan lines
    b = p[:, axis]      # coordinate along them
    a0, a1 = a, np.roll(a, -1)
    b0, b1 = b, np.roll(b, -1)
    lo, hi = np.minimum(a0, a1), np.maximum(a0, a1)
    k0 = np.ceil(lo - 0.5).astype(np.int64)
    k1 = np.ceil(hi - 0.5).astype(np.int64)  # exclusive
    cnt = np.where(a1 != a0, np.maximum(k1 - k0, 0), 0)
    if cnt.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    seg = np.repeat(np.arange(len(p)), cnt)
    first = np.repeat(np.cumsum(cnt) - cnt, cnt)
    line = np.repeat(k0, cnt) + (np.arange(int(cnt.sum())) - first)
    s = line + 0.5
    t = (s - a0[seg]) / (a1[seg] - a0[seg])
    pos = b0[seg] + t * (b1[seg] - b0[seg])
    return line, pos, seg


def _pairs(line: np.ndarray, pos: np.ndarray) -> dict[int, tuple[float, float, int, int]]:
    """Scan lines crossed exactly twice: ``{line: (low, high, i_low, i_high)}`` (indices into the inputs)."""
    if len(line) == 0:
        return {}
    order = np.lexsort((pos, line))
    ls = line[order]
    uniq, start, count = np.unique(ls, return_index=True, return_counts=True)
    out = {}
    for k, s0, c in zip(uniq, start, count):
        if c == 2:
            i, j = order[s0], order[s0 + 1]
            out[int(k)] = (float(pos[i]), float(pos[j]), int(i), int(j))
    return out


def midline_samples(contour: np.ndarray, design: np.ndarray, shape: tuple[int, int], axis: int, *,
                    clear_px: float = 8.0, max_dev_px: float = 6.0, border_px: float = 2.0,
                    aspect: float = 2.0) -> np.ndarray:
    """Midline offsets (printed minus design, px along ``axis``) of one feature; see the module docs."""
    d_line, d_pos, d_seg = scan_crossings(design, axis)
    if len(d_line) == 0:
        return np.zeros(0)
    dp = np.asarray(design, dtype=np.float64)
    nxt = np.roll(dp, -1, axis=0)
    seg_len = np.hypot(*(nxt - dp).T)
    # distance along each crossed side from the crossing to the side's nearer end
    s_line = d_line + 0.5
    a0, a1 = dp[d_seg, 1 - axis], nxt[d_seg, 1 - axis]
    t = (s_line - a0) / (a1 - a0)
    along = np.minimum(t, 1.0 - t) * seg_len[d_seg]
    dpairs = _pairs(d_line, d_pos)
    c_line, c_pos, _ = scan_crossings(contour, axis)
    cpairs = _pairs(c_line, c_pos)
    extent = shape[1] if axis == 0 else shape[0]
    out = []
    for k, (lo, hi, i, j) in dpairs.items():
        cp = cpairs.get(k)
        if cp is None:
            continue
        width = hi - lo
        if along[i] < clear_px or along[j] < clear_px:
            continue
        if min(seg_len[d_seg[i]], seg_len[d_seg[j]]) < aspect * width:
            continue
        clo, chi = cp[0], cp[1]
        if abs(clo - lo) > max_dev_px or abs(chi - hi) > max_dev_px:
            continue
        if min(clo, chi) < border_px or max(clo, chi) > extent - border_px:
            continue
        out.append(0.5 * ((clo + chi) - (lo + hi)))
    return np.asarray(out, dtype=np.float64)


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
    d_line, d_pos, d_seg = scan_crossings(design, axis)
    if len(d_line) == 0:
        return np.zeros(0), np.zeros(0)
    dp = np.asarray(design, dtype=np.float64)
    nxt = np.roll(dp, -1, axis=0)
    seg_len = np.hypot(*(nxt - dp).T)
    a0, a1 = dp[d_seg, 1 - axis], nxt[d_seg, 1 - axis]
    t = (d_line + 0.5 - a0) / (a1 - a0)
    dpairs = _pairs(d_line, d_pos)
    c_line, c_pos, _ = scan_crossings(contour, axis)
    order = np.argsort(c_line, kind="stable")
    c_line, c_pos = c_line[order], c_pos[order]
    extent = shape[1] if axis == 0 else shape[0]
    vals, face = [], []
    for k, (lo, hi, i, j) in dpairs.items():
        width = hi - lo
        a, b = np.searchsorted(c_line, k), np.searchsorted(c_line, k, side="right")
        if a == b:
            continue
        cc = c_pos[a:b]
        for idx, dpos, sgn in ((i, lo, -1.0), (j, hi, 1.0)):
            L = seg_len[d_seg[idx]]
            if L * aspect > width or not (1.0 / 3.0 <= t[idx] <= 2.0 / 3.0):
                continue  # not a short side, or not the middle of it
            m = int(np.argmin(np.abs(cc - dpos)))
            if abs(cc[m] - dpos) > max_dev_px or cc[m] < border_px or cc[m] > extent - border_px:
                continue
            vals.append(cc[m] - dpos)
            face.append(sgn)
    return np.asarray(vals, dtype=np.float64), np.asarray(face, dtype=np.float64)


def refine_offset(contours: Sequence[np.ndarray | None], designs: Sequence[np.ndarray], shape: tuple[int, int], *,
                  clear_px: float = 8.0, max_dev_px: float = 6.0, border_px: float = 2.0,
                  min_samples: int = 30, min_features: int = 2, max_shift_px: float = 5.0,
                  corr_px: float = 10.0, ends: bool = True, end_max_dev_px: float = 12.0,
                  min_end_samples: int = 8, end_min_shift_px: float = 1.5) -> EdgeAlignResult:
    """Residual ``(du, dv)`` of the printed content from the design, from extracted contours.

    Parameters
    ----------
    contours : per feature, the extracted closed contour ``(N, 2)`` (u, v) px, or None.
    designs : per feature, the design polygon in the same pixel frame.
    shape : image ``(H, W)``.
    clear_px, max_dev_px, border_px : cross-section rules (module docs).
    min_samples, min_features : evidence needed per axis.
    max_shift_px : larger corrections are not applied (the appearance
        alignment stands; the result still reports them).
    ends, end_max_dev_px, min_end_samples : an axis without any long-side
        cross-section (e.g. the along-line axis of a field of horizontal lines,
        where the appearance alignment leans on line ends cut by the border) is
        measured on line ends instead (:func:`end_samples`): ends facing +
        and ends facing - pull back alike, so the mean of their two median
        offsets is the shift; needs ``min_end_samples`` of each facing. Pullback
        differs between free ends and ends facing a neighbour (up to ~1 px on
        the synth benchmark), so this estimate is coarse: it corrects the
        appearance alignment only when it disagrees by at least
        ``end_min_shift_px`` (a gross bias, e.g. 4 px from line ends cut by the
        border), and it is never used where long sides exist.
    corr_px : correlation length of neighbouring cross-sections (edge
        roughness), for the standard error only.
    """
    if len(contours) != len(designs):
        raise ValueError(f"refine_offset: {len(contours)} contours for {len(designs)} designs")
    shift, applied, meas, ns, nf, sig, samples, basis = [], [], [], [], [], [], [], []
    for axis in (0, 1):
        per = []
        for c, d in zip(contours, designs):
            if c is None or len(c) < 3 or d is None or len(d) < 3:
                continue
            s = midline_samples(c, d, shape, axis, clear_px=clear_px, max_dev_px=max_dev_px, border_px=border_px)
            if len(s):
                per.append(s)
        allv = np.concatenate(per) if per else np.zeros(0)
        n = len(allv)
        if n:
            med = float(np.median(allv))
            mad = 1.4826 * float(np.median(np.abs(allv - med)))
            se = mad / np.sqrt(max(n / max(corr_px, 1.0), 1.0))
        else:
            med, se = 0.0, float("nan")
        ok = n >= min_samples and len(per) >= min_features and abs(med) <= max_shift_px
        how = "sides" if ok else "none"
        if n == 0 and ends:
            ev, ef = [], []
            for c, d in zip(contours, designs):
                if c is None or len(c) < 3 or d is None or len(d) < 3:
                    continue
                v_, f_ = end_samples(c, d, shape, axis, max_dev_px=end_max_dev_px, border_px=border_px)
                ev.append(v_)
                ef.append(f_)
            ev_, ef_ = (np.concatenate(ev), np.concatenate(ef)) if ev else (np.zeros(0), np.zeros(0))
            plus, minus = ev_[ef_ > 0], ev_[ef_ < 0]
            if min(len(plus), len(minus)) >= min_end_samples:
                med = 0.5 * (float(np.median(plus)) + float(np.median(minus)))
                allv = np.concatenate([plus - float(np.median(plus)), minus - float(np.median(minus))]) + med
                n = len(allv)
                se = 1.4826 * float(np.median(np.abs(allv - med))) / np.sqrt(max(n / 2.0, 1.0))
                if end_min_shift_px <= abs(med) <= max_shift_px:
                    ok, how = True, "ends"
        basis.append(how)
        shift.append(med if ok else 0.0)
        applied.append(ok)
        meas.append(med)
        ns.append(n)
        nf.append(len(per))
        sig.append(se)
        samples.append(allv)
    return EdgeAlignResult(tuple(shift), tuple(applied), tuple(meas), tuple(ns), tuple(nf), tuple(sig), tuple(samples),
                           tuple(basis))


__all__ = ["EdgeAlignResult", "end_samples", "midline_samples", "refine_offset", "scan_crossings"]
