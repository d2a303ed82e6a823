"""Self-contained HTML pages: `edgetl evaluate --html` and `edgetl lint --html`. Torch-free.

One file each, nothing fetched: images are embedded as base64 JPEG data URIs, the style is inline,
and a Content-Security-Policy forbids the page any other source. Every name (class, file) is
escaped with `html.escape`.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import numpy as np

from edgetl.data.pipeline import prefetch_map
from edgetl.data.preprocess import decode_bgr, opencv
from edgetl.data.sources import read_regular
from edgetl.errors import ImageError
from edgetl.files import write_text
from edgetl.quality.lint import CATEGORIES, DESCRIBE

THUMB = 160  # longer side of a thumbnail, pixels
MAX_MISTAKES = 24
MAX_PER_SECTION = 60

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
.sub{color:#5b6773}.big{font-size:28px;font-weight:600}.bad{color:#b3261e}.ok{color:#1e7a34}.warn{color:#8a5a00}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #dde3ea;padding:4px 8px;text-align:right}
th{background:#f3f6f9}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:172px;border:1px solid #dde3ea;border-radius:6px;padding:5px;
font-size:12px;overflow-wrap:anywhere}.card img{display:block;max-width:160px;max-height:160px;margin:0 auto 4px}
.group{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;border:1px solid #dde3ea;border-radius:6px;
padding:6px;margin:8px 0}.group.loud{border:2px solid #b3261e;background:#fff6f5}.tag{display:inline-block;
padding:0 6px;border-radius:9px;background:#eef2f6;margin-right:4px}.tag.loud{background:#b3261e;color:#fff}
.noimg{width:160px;height:60px;display:flex;align-items:center;justify-content:center;background:#f3f6f9;color:#5b6773}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(text) -> str:
    """Any name (a non-UTF-8 file name included) as HTML text."""
    return html.escape(str(text).encode("utf-8", "backslashreplace").decode("utf-8"))


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def thumbnail(path, side: int = THUMB) -> str | None:
    """A photo as a small JPEG data URI (decoded by edgetl's own decoder); None when unreadable."""
    cv2 = opencv()
    try:
        bgr = decode_bgr(read_regular(path), min_side=side)
    except ImageError:
        return None
    h, w = bgr.shape[:2]
    s = side / max(h, w)
    if s < 1:
        bgr = cv2.resize(bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii") if ok else None


def thumbnails(paths) -> dict:
    """path → data URI (or None), decoded in threads."""
    unique = list(dict.fromkeys(paths))
    return dict(prefetch_map(thumbnail, unique))


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">' if uri else '<div class="noimg">unreadable</div>'


def write_page(path, text: str) -> None:
    write_text(path, text)


# --- evaluate --------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def confusion_table(m: dict) -> str:
    """The confusion matrix as a table, each cell shaded by its share of the row (rows: true class)."""
    cm = m.get("confusion_matrix")
    classes = m["classes"]
    if cm is None or len(classes) > 60:
        rows = "".join(f'<tr><td class="l">{esc(x["true"])}</td><td class="l">{esc(x["predicted"])}</td>'
                       f'<td>{x["count"]}</td></tr>' for x in (m.get("top_confusions") or [])[:50])
        return ('<p class="sub">Too many classes for a matrix: the most frequent confusions.</p>'
                f'<table><tr><th class="l">true</th><th class="l">predicted</th><th>count</th></tr>{rows}</table>')
    head = "".join(f'<th title="{esc(c)}">{esc(c[:12])}</th>' for c in classes)
    body = []
    for c, row in zip(classes, cm):
        total = max(sum(row), 1)
        cells = []
        for j, v in enumerate(row):
            a = v / total
            colour = "30,122,52" if classes[j] == c else "179,38,30"
            fg = "#fff" if a > 0.6 else "#1d232a"
            cells.append(f'<td style="background:rgba({colour},{a:.2f});color:{fg}">{v}</td>')
        body.append(f'<tr><th class="l">{esc(c)}</th>{"".join(cells)}</tr>')
    return (f'<table><tr><th class="l">true ↓ / predicted →</th>{head}</tr>{"".join(body)}</table>')


def evaluation_page(m: dict, rows: list, note: str, model_path: str, data: str, warnings: list[str] = (),
                    skipped: int = 0, max_mistakes: int = MAX_MISTAKES) -> str:
    """The page of `edgetl evaluate --html`: accuracy, per-class table, confusion matrix and thumbnails
    of the most confident mistakes. `rows`: (path, true index, probabilities) per scored photo."""
    classes = m["classes"]
    if m["n"]:
        lo, hi = m["accuracy_ci95"]
        score = (f'<p><span class="big">{m["accuracy"]:.2%}</span> accuracy ({m["correct"]}/{m["n"]}, 95 % interval '
                 f'{lo:.1%}–{hi:.1%}), balanced accuracy <b>{m["balanced_accuracy"]:.1%}</b>; always answering the '
                 f'largest class would score {m["majority_accuracy"]:.1%}.</p>')
    else:
        score = "<p>No photos were scored.</p>"
    warn = "".join(f'<p class="warn">warning: {esc(w)}</p>' for w in warnings)
    if skipped:
        warn += f'<p class="warn">{skipped} unreadable photos were skipped.</p>'
    per = "".join(
        f'<tr><td class="l">{esc(c)}</td><td>{_pct(m["per_class"][c]["precision"])}</td>'
        f'<td>{_pct(m["per_class"][c]["recall"])}</td><td>{_pct(m["per_class"][c]["f1"])}</td>'
        f'<td>{m["per_class"][c]["support"]}</td></tr>' for c in classes)
    wrong = [(path, t, p) for path, t, p in rows if int(np.argmax(p)) != t]
    wrong.sort(key=lambda r: -float(np.max(r[2])))
    shown = wrong[:max_mistakes]
    thumbs = thumbnails([r[0] for r in shown])
    cards = []
    for path, t, p in shown:
        j = int(np.argmax(p))
        name = os.path.basename(os.fsdecode(path))
        cards.append(f'<div class="card">{_img(thumbs.get(path), name)}<b class="bad">{esc(classes[j])}</b> '
                     f'{p[j]:.3f}<br>labelled <b>{esc(classes[t])}</b> ({p[t]:.3f})<br>'
                     f'<span class="sub">{esc(name)}</span></div>')
    mistakes = ('<div class="grid">' + "".join(cards) + "</div>") if cards else "<p>No mistakes.</p>"
    more = f'<p class="sub">… and {len(wrong) - len(shown)} more mistakes.</p>' if len(wrong) > len(shown) else ""
    body = (f"<h1>edgetl evaluate</h1><p class=\"sub\">model {esc(model_path)} on {esc(data)}; scored: {esc(note)}</p>"
            f"{score}{warn}<h2>Per class</h2><table><tr><th class=\"l\">class</th><th>precision</th><th>recall</th>"
            f"<th>F1</th><th>support</th></tr>{per}</table><h2>Confusion matrix</h2>{confusion_table(m)}"
            f"<h2>Most confident mistakes ({len(wrong)} in all)</h2>"
            f'<p class="sub">Predicted class and its probability, then the label.</p>{mistakes}{more}')
    return page(f"edgetl evaluate — {Path(model_path).name}", body)


# --- lint ------------------------------------------------------------------------------------------

def lint_page(report: dict, max_per_section: int = MAX_PER_SECTION) -> str:
    """The page of `edgetl lint --html`, from the report `quality.lint.lint` returns."""
    root = Path(report["data"])
    counts = report["counts"]
    fail = set(report.get("fail_on") or ())
    dups = report["duplicates"]
    wanted: list = []
    shown_dups = dups[:max_per_section]
    for g in shown_dups:
        wanted += [root / it["path"] for it in g["items"][:12]]
    for key in ("label_errors", "outliers", "small_images"):
        wanted += [root / it["path"] for it in report[key][:max_per_section]]
    thumbs = thumbnails(wanted)

    def card(it, extra=""):
        p = root / it["path"]
        where = " · ".join(esc(x) for x in (it.get("label"), it.get("split")) if x)
        return (f'<div class="card">{_img(thumbs.get(p), it["path"])}{extra}<span class="sub">{where}</span><br>'
                f'{esc(it["path"])}</div>')

    def more(items):
        n = len(items) - max_per_section
        return f'<p class="sub">… and {n} more (see --json).</p>' if n > 0 else ""

    rows = "".join(
        f'<tr><td class="l">{c}</td><td class="{"bad" if counts[c] and c in fail else ""}">{counts[c]}</td>'
        f'<td class="l">{esc(DESCRIBE[c])}</td></tr>' for c in CATEGORIES)
    s = report["settings"]
    parts = [f'<h1>edgetl lint</h1><p class="sub">{esc(report["data"])}: {report["images"]} images, '
             f'{len(report["classes"])} classes; backbone {esc(report["backbone"])}; {esc(report.get("split") or "")}</p>',
             f'<table><tr><th class="l">check</th><th>found</th><th class="l">what</th></tr>{rows}</table>',
             f'<p class="sub">Near duplicates: cosine similarity ≥ {s["near_duplicate_cosine"]:.3f} '
             f'({esc(s["near_duplicate_how"])}).</p>']
    parts.append(f"<h2>Duplicates ({len(dups)} groups)</h2>")
    for g in shown_dups:
        loud = g["leakage"] or g["conflict"]
        tags = "".join(f'<span class="tag loud">{t}</span>' for t in ("leakage", "conflict") if g[t])
        tags += f'<span class="tag">{g["kind"]}, similarity {g["similarity"]:.3f}</span>'
        cards = "".join(card(it) for it in g["items"][:12])
        parts.append(f'<div class="group{" loud" if loud else ""}"><div style="width:100%">{tags}</div>{cards}</div>')
    parts.append(more(dups))
    le = report["label_errors"]
    parts.append(f"<h2>Likely label errors ({len(le)})</h2>")
    parts.append(f'<p class="sub">{esc(s.get("label_error_how") or "")}</p>')
    parts.append('<div class="grid">' + "".join(
        card(it, f'labelled <b>{esc(it["label"])}</b> ({it["p_label"]:.2f}),<br>looks like '
                 f'<b class="bad">{esc(it["suggested"])}</b> ({it["p_suggested"]:.2f})<br>')
        for it in le[:max_per_section]) + "</div>" + more(le))
    out = report["outliers"]
    parts.append(f"<h2>Outliers ({len(out)})</h2>")
    parts.append('<div class="grid">' + "".join(
        card(it, f'similarity to nearest {it["score"]:.2f}<br>') for it in out[:max_per_section]) + "</div>" + more(out))
    small = report["small_images"]
    parts.append(f"<h2>Tiny or upscaled images ({len(small)})</h2>")
    parts.append('<div class="grid">' + "".join(
        card(it, f'<b>{it["kind"]}</b> {it["width"]}×{it["height"]}<br>') for it in small[:max_per_section])
        + "</div>" + more(small))
    imb = report["imbalance"]
    crow = "".join(f'<tr><td class="l">{esc(c)}</td><td>{n}</td><td class="l"><div style="background:#5b8def;height:10px;'
                   f'width:{int(300 * n / max(max(report["classes"].values()), 1))}px"></div></td></tr>'
                   for c, n in report["classes"].items())
    ratio = f"largest / smallest class: {imb['ratio']:.1f}" if imb else "one class or unlabelled: not measured"
    parts.append(f"<h2>Classes</h2><p class=\"sub\">{esc(ratio)}</p><table>{crow}</table>")
    bad = report["unreadable"]
    parts.append(f"<h2>Unreadable files ({len(bad)})</h2><ul>"
                 + "".join(f"<li>{esc(it['path'])}: {esc(it['reason'])}</li>" for it in bad[:200]) + "</ul>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.get("notes", []))
    if notes:
        parts.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    return page(f"edgetl lint — {root.name}", "\n".join(parts))

