"""Look of ``report.html``: the stylesheet and the script (colours: :mod:`.palette`).

Everything is inline so the report is one self-contained file that opens
offline. The page works with JavaScript disabled; the script only adds
niceties (highlighting one stage across every picture on hover, sorting a
table by a clicked column) and, last, marks the page as rendered
(``data-report-ok``) so the browser test can tell a page whose script ran
from one whose script failed.
"""

from __future__ import annotations

from pipec.viz import palette


def stage_color(stage: int) -> str:
    """The colour of ``stage`` in every picture of the report (:func:`.palette.stage_colour`)."""
    return palette.stage_colour(stage)


_ROOT = (
    f":root {{ --fg:{palette.INK}; --muted:{palette.MUTED_INK}; --line:{palette.RULE}; --bg:{palette.PAPER}; "
    f"--panel:#f6f8fa;\n  --accent:#0969da; --bad:{palette.BAD}; --warn:#9a6700; --good:{palette.GOOD}; "
    f"--track:{palette.TRACK}; }}"
)

CSS = _ROOT + """
* { box-sizing: border-box; }
html { background: var(--bg); }
body { margin: 0; color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header.top { background: #24292f; color: #fff; padding: 18px 0 14px; }
header.top .wrap { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
header.top h1 { margin: 0; font-size: 22px; font-weight: 600; }
header.top .sub { color: #c9d1d9; }
nav.toc { position: sticky; top: 0; z-index: 5; background: rgba(255,255,255,.96);
  border-bottom: 1px solid var(--line); }
nav.toc .wrap { display: flex; gap: 18px; padding: 8px 0; flex-wrap: wrap; }
nav.toc a { color: var(--accent); text-decoration: none; font-weight: 500; }
nav.toc a:hover { text-decoration: underline; }
.wrap { max-width: 1240px; margin: 0 auto; padding: 0 20px; }
section { margin: 26px 0 34px; }
section h2 { font-size: 18px; margin: 0 0 4px; }
p.note { color: var(--muted); margin: 2px 0 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(215px, 1fr)); gap: 10px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.card.long .v { font-size: 15px; line-height: 1.9; }
.card .d { color: var(--muted); font-size: 12px; }
.card.hi { border-color: var(--accent); }
.card.bad { border-color: var(--bad); }
.card.bad .v { color: var(--bad); }
.row2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; margin-top: 16px; }
.panel { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.panel h3 { margin: 0 0 8px; font-size: 14px; }
figure { margin: 0; overflow-x: auto; }
figure svg { display: block; max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 6px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: middle; }
th { background: var(--panel); font-weight: 600; font-size: 12px; color: var(--muted); white-space: nowrap; }
td.n, th.n { text-align: right; white-space: nowrap; }
tbody tr:hover { background: #f3f6fa; }
table.sortable th { cursor: pointer; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.sw { display: inline-block; width: 12px; height: 12px; border-radius: 3px; vertical-align: -1px;
  margin-right: 6px; border: 1px solid rgba(0,0,0,.15); }
.tbar { display: flex; height: 10px; width: 160px; border-radius: 3px; overflow: hidden; background: var(--track); }
.tbar span { display: block; height: 100%; }
.legend { color: var(--muted); font-size: 12px; display: flex; gap: 14px; flex-wrap: wrap; margin: 6px 0; }
.ratio-good { color: var(--good); font-weight: 600; }
.ratio-warn { color: var(--warn); font-weight: 600; }
.ratio-bad { color: var(--bad); font-weight: 600; }
.tag { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 11px; font-weight: 600; }
.tag.win { background: #dafbe1; color: var(--good); }
.tag.nofit { background: #ffebe9; color: var(--bad); }
.warnbox { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.errbox { background: #ffebe9; border: 1px solid #ff8182; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
details summary { cursor: pointer; color: var(--accent); }
footer { color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding: 14px 0 30px; }
[data-stage] { transition: opacity .12s; }
.dim { opacity: .18; }
@media (max-width: 900px) { .row2 { grid-template-columns: 1fr; } }
@media print { nav.toc { position: static; } }
"""

JS = """
(function () {
  "use strict";
  var stageEls = document.querySelectorAll("[data-stage]");
  function highlight(stage) {
    for (var i = 0; i < stageEls.length; i++) {
      var s = stageEls[i].getAttribute("data-stage");
      stageEls[i].classList.toggle("dim", stage !== null && s !== stage);
    }
  }
  for (var i = 0; i < stageEls.length; i++) {
    stageEls[i].addEventListener("mouseenter", function (e) {
      highlight(e.currentTarget.getAttribute("data-stage"));
    });
    stageEls[i].addEventListener("mouseleave", function () { highlight(null); });
  }
  function cellValue(row, col) {
    var cell = row.children[col];
    var v = cell ? (cell.getAttribute("data-v") || cell.textContent) : "";
    var n = parseFloat(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  var tables = document.querySelectorAll("table.sortable");
  for (var t = 0; t < tables.length; t++) {
    (function (table) {
      var heads = table.querySelectorAll("thead th");
      for (var h = 0; h < heads.length; h++) {
        (function (col, th) {
          th.addEventListener("click", function () {
            var body = table.tBodies[0];
            var rows = Array.prototype.slice.call(body.rows);
            var asc = th.getAttribute("data-sort") !== "asc";
            rows.sort(function (a, b) {
              var x = cellValue(a, col), y = cellValue(b, col);
              return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
            });
            for (var r = 0; r < rows.length; r++) { body.appendChild(rows[r]); }
            for (var k = 0; k < heads.length; k++) { heads[k].removeAttribute("data-sort"); }
            th.setAttribute("data-sort", asc ? "asc" : "desc");
          });
        })(h, heads[h]);
      }
    })(tables[t]);
  }
  document.documentElement.setAttribute("data-report-ok", "1");
})();
"""
