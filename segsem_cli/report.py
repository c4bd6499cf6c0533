"""The review report: one self-contained HTML page (opens from disk) and a JSON twin.

The page holds the run's summary metrics, one section per image with its
overlay PNG embedded as a data URI (no external files, no scripts from the
network), a per-feature table (source, confidence, status) and the list of
failures. ``report.json`` holds the same numbers for machines.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .atomic import write_json, write_text

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 8px;font-size:.9em;text-align:left}
th{background:#f3f3f3} .failed,.error{color:#b00} .ambiguous{color:#a60} .ok{color:#070}
img.overlay{max-width:640px;border:1px solid #999;image-rendering:pixelated}
details{margin:.3em 0} .kpi{display:inline-block;margin-right:2em} .kpi b{font-size:1.3em}
"""


def _img_tag(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p><i>no overlay for {html.escape(alt)}</i></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="overlay" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def build_report(images: list[dict], *, title: str, threshold: float | None, model: str | None, overlays_dir: Path,
                 backbone: str = "sam2") -> tuple[str, dict]:
    """Return ``(html_text, json_dict)`` for per-image records as written by the pipeline."""
    n_feat = sum(len(r.get("features", [])) for r in images)
    sources: dict[str, int] = {}
    failures: list[dict] = []
    for r in images:
        if r.get("status") in ("failed", "error"):
            failures.append({"image": r["image"], "feature_id": "", "status": r.get("status"), "message": r.get("message", "")})
        for f in r.get("features", []):
            if f.get("status") == "ok":
                sources[f["source"]] = sources.get(f["source"], 0) + 1
            else:
                failures.append({"image": r["image"], "feature_id": f["feature_id"], "status": f.get("status"), "message": f.get("source", "")})
    n_ok = sum(sources.values())
    data = {
        "title": title,
        "model": model,
        "threshold": threshold,
        "images": len(images),
        "images_by_status": {s: sum(1 for r in images if r.get("status") == s) for s in ("ok", "ambiguous", "failed", "error")},
        "features": n_feat,
        "features_ok": n_ok,
        "sources": sources,
        "fallback_rate": (sum(v for k, v in sources.items() if k != backbone) / n_ok) if n_ok and model else None,
        "failures": failures,
        "per_image": [
            {k: r.get(k) for k in ("image", "status", "message", "offset_nm", "offset_px", "align_score", "residual_px", "n_features", "n_ok", "elapsed_s")}
            | {"features": [{k: f.get(k) for k in ("feature_id", "source", "confidence", "status")} for f in r.get("features", [])]}
            for r in images
        ],
    }
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>{e(title)}</h1>")
    parts.append(f"<p>model: <code>{e(str(model or 'none (fallback only)'))}</code> &middot; confidence threshold: {threshold if threshold is not None else '-'}</p>")
    kp = data["images_by_status"]
    parts.append(
        "<div>"
        f"<span class='kpi'>images <b>{len(images)}</b> (ok {kp['ok']}, ambiguous {kp['ambiguous']}, failed {kp['failed'] + kp['error']})</span>"
        f"<span class='kpi'>features <b>{n_ok}/{n_feat}</b> extracted</span>"
        f"<span class='kpi'>sources <b>{e(', '.join(f'{k}: {v}' for k, v in sorted(sources.items())) or '-')}</b></span>"
        "</div>"
    )
    parts.append("<h2>Images</h2><table id='images'><tr><th>image</th><th>status</th><th>offset nm (x, y)</th><th>align score</th><th>features ok</th><th>time s</th><th>message</th></tr>")
    for r in images:
        off = r.get("offset_nm")
        off_s = f"{off[0]:+.2f}, {off[1]:+.2f}" if off else ""
        sc = r.get("align_score")
        st = r.get("status", "")
        parts.append(
            f"<tr><td><a href='#img-{e(r['image'])}'>{e(r['image'])}</a></td><td class='{e(st)}'>{e(st)}</td><td>{off_s}</td>"
            f"<td>{'' if sc is None else f'{sc:.3f}'}</td><td>{r.get('n_ok', 0)}/{r.get('n_features', 0)}</td>"
            f"<td>{r.get('elapsed_s', '')}</td><td>{e(r.get('message', '') or '')}</td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<h2>Failures ({len(failures)})</h2>")
    if failures:
        parts.append("<table id='failures'><tr><th>image</th><th>feature</th><th>status</th><th>detail</th></tr>")
        for f in failures:
            parts.append(f"<tr><td>{e(f['image'])}</td><td>{e(f['feature_id'])}</td><td class='failed'>{e(str(f['status']))}</td><td>{e(str(f['message']))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    for r in images:
        parts.append(f"<h2 id='img-{e(r['image'])}'>{e(r['image'])} <span class='{e(r.get('status', ''))}'>({e(r.get('status', ''))})</span></h2>")
        parts.append(_img_tag(overlays_dir / f"{r['image']}.png", r["image"]))
        feats = r.get("features", [])
        if feats:
            parts.append(f"<details><summary>{len(feats)} features</summary><table><tr><th>feature</th><th>source</th><th>confidence</th><th>status</th></tr>")
            for f in feats:
                parts.append(f"<tr><td>{e(f['feature_id'])}</td><td>{e(f['source'])}</td><td>{f['confidence']:.3f}</td><td class='{e(f['status'])}'>{e(f['status'])}</td></tr>")
            parts.append("</table></details>")
    parts.append(
        "<script>window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
        "document.body.setAttribute('data-images-total',im.length);"
        "document.body.setAttribute('data-images-loaded',im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length);});</script>"
    )
    parts.append("<p style='color:#888'>overlay colours: layout blue; extracted contours in red, green, ... by source (legend in the top-left corner of each image).</p></body></html>")
    return "\n".join(parts), data


def write_report(summary, cfg) -> list[Path]:
    """Write ``report.html`` and ``report.json`` into the run's output folder."""
    out = Path(cfg.out)
    images = []
    for b in summary.images:
        p = out / "images" / f"{b['image']}.json"
        images.append(json.loads(p.read_text()) if p.is_file() else b)
    text, data = build_report(images, title=f"segsem report: {out.name}", threshold=summary.threshold, model=summary.model, overlays_dir=out / "overlays",
                              backbone=cfg.backbone)
    data["outputs"] = summary.outputs
    h = write_text(out / "report.html", text)
    j = write_json(out / "report.json", data)
    return [h, j]
