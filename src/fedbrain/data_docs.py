"""Great Expectations Data Docs made self-contained: readable offline, nothing fetched from the internet.

GE 1.24's pages load Bootstrap, bootstrap-table, jQuery, Font Awesome and Vega from CDNs and its
logo from S3. Offline (a hospital network) they render as unstyled lists, and the index page's
tables, which bootstrap-table fills from JavaScript, are empty. None of those libraries is in a
package we install, so after GE writes the site every page is rewritten here instead:

- every ``<link>`` and ``<script src>`` to another host is removed, and so is every inline script
  (all of them drive those libraries: tables, tabs, the "failed only" filter);
- the index's tables are written out as plain HTML tables, from the rows GE handed to
  bootstrap-table (a row's link on each of its cells, as a click on the row would follow);
- the logo comes from the site's own ``static/images``; remote ``url(...)`` in styles are dropped,
  and so is GE's newsletter footer;
- a small stylesheet (the part of Bootstrap 4 these pages use, and glyphs for the icons) is
  inlined in ``<head>``.

Lost offline: sorting and filtering the index tables, the "failed only" button and the tabs (every
section is shown, the tab names link to them).
"""

from __future__ import annotations

import ast
import html
import os
import re
from pathlib import Path

_REMOTE = r"(?:https?:)?//"
REMOTE_LINK = re.compile(rf"<link\b[^>]*\bhref\s*=\s*[\"']?{_REMOTE}[^>]*>", re.I)
SCRIPT = re.compile(r"<script\b[^>]*>.*?</script\s*>", re.I | re.S)
REMOTE_IMG = re.compile(rf"(<img\b[^>]*?\bsrc\s*=\s*)\"{_REMOTE}[^\"]*?/([\w.-]+)(?:\?[^\"]*)?\"", re.I | re.S)
REMOTE_URL = re.compile(rf"url\(\s*['\"]?{_REMOTE}[^)]*\)", re.I)
# The call bootstrap_table.j2 writes: columns and rows are Python reprs of lists of dicts.
BOOTSTRAP_TABLE = re.compile(
    r"\$\('#(?P<id>[\w-]+)'\)\.bootstrapTable\(\s*Object\.assign\(\s*\{\s*columns:\s*(?P<columns>\[.*?\]),"
    r"\s*data:\s*(?P<data>\[.*?\]),\s*toolbar:", re.S)
CLEAR_FILTERS = re.compile(r"<button\b[^>]*onclick=\"clearTableFilters\([^\"]*\)\"[^>]*>.*?</button>", re.S)
FOOTER = re.compile(r"<footer\b.*?</footer\s*>", re.I | re.S)  # GE's newsletter link
ACTIONS_CARD = re.compile(r"<div class=\"card mb-3\">\s*<div class=\"card-header p-2\">\s*<strong>Actions</strong>")
MARK = "<!-- fedbrain: offline -->"

STYLE = """
body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:15px;
 line-height:1.5;color:#212529;background:#fff}
a{color:#0062cc;text-decoration:none}a:hover{text-decoration:underline}
*,::after,::before{box-sizing:border-box}
h1,h2,h3,h4,h5,h6,.h6{margin:.5rem 0;font-weight:600;line-height:1.25}.lead{font-size:1.1rem}
.container-fluid{width:100%;padding-left:15px;padding-right:15px}
.row{display:flex;flex-wrap:wrap;margin-left:-15px;margin-right:-15px}
[class*="col-"]{position:relative;width:100%;padding-left:15px;padding-right:15px}
.col-12{flex:0 0 100%;max-width:100%}.col-6{flex:0 0 50%;max-width:50%}
@media(min-width:768px){.col-md-2{flex:0 0 16.667%;max-width:16.667%}.col-md-10{flex:0 0 83.333%;max-width:83.333%}
 .d-md-block{display:block!important}.d-md-inline-flex{display:inline-flex!important}
 .pl-md-4{padding-left:1.5rem!important}.pr-md-3{padding-right:1rem!important}}
@media(min-width:992px){.col-lg-2{flex:0 0 16.667%;max-width:16.667%}.col-lg-10{flex:0 0 83.333%;max-width:83.333%}}
.d-none{display:none!important}.d-flex{display:flex!important}.align-items-center{align-items:center!important}
.justify-content-center{justify-content:center!important}.float-left{float:left}.h-100{height:100%}.mr-auto{margin-right:auto}
.m-0{margin:0!important}.m-2{margin:.5rem!important}.mt-0{margin-top:0!important}.mt-1{margin-top:.25rem!important}
.mt-3{margin-top:1rem!important}.mb-0{margin-bottom:0!important}.mb-1{margin-bottom:.25rem!important}
.mb-2{margin-bottom:.5rem!important}.mb-3{margin-bottom:1rem!important}.mb-4{margin-bottom:1.5rem!important}
.ml-1{margin-left:.25rem!important}.ml-2{margin-left:.5rem!important}.mr-0{margin-right:0!important}
.mr-2{margin-right:.5rem!important}.p-0{padding:0!important}.p-1{padding:.25rem!important}.p-2{padding:.5rem!important}
.p-3{padding:1rem!important}.px-0{padding-left:0!important;padding-right:0!important}.pt-0{padding-top:0!important}
.pt-4{padding-top:1.5rem!important}.pb-0{padding-bottom:0!important}.pb-1{padding-bottom:.25rem!important}
.pb-4{padding-bottom:1.5rem!important}.pl-5{padding-left:3rem!important}.pr-5{padding-right:3rem!important}
.pr-3{padding-right:1rem!important}.pl-sm-3{padding-left:1rem}
.sticky-top{position:sticky;top:0;z-index:1020}.border-bottom{border-bottom:1px solid #dee2e6}
.navbar{display:flex;align-items:center;padding:.5rem 1rem;background:#fff}.navbar-brand{margin-right:1rem}
.nav{display:flex;flex-wrap:wrap;padding-left:0;margin:0;list-style:none}
.nav-link{display:block;padding:.4rem .8rem}.nav-tabs{border-bottom:1px solid #dee2e6;margin-bottom:.5rem}
.nav-tabs .nav-link{border:1px solid transparent;border-radius:.25rem .25rem 0 0}
.nav-tabs .nav-link.active{border-color:#dee2e6 #dee2e6 #fff;background:#fff;color:#495057}
.tab-content>.tab-pane{display:block;margin-bottom:1.5rem}
.alert{position:relative;padding:.6rem 1rem;margin-bottom:1rem;border:1px solid transparent;border-radius:.25rem}
.alert-secondary{color:#383d41;background:#e2e3e5;border-color:#d6d8db}
.card{display:flex;flex-direction:column;min-width:0;background:#fff;border:1px solid rgba(0,0,0,.125);border-radius:.25rem}
.card-header{padding:.5rem 1rem;background:rgba(0,0,0,.03);border-bottom:1px solid rgba(0,0,0,.125)}
.card-body{flex:1 1 auto;padding:1rem}.card-text{margin:0}.rounded{border-radius:.25rem}
.bg-light{background:#f8f9fa!important}
.breadcrumb{display:flex;flex-wrap:wrap;list-style:none;padding:.5rem 1rem;border-radius:.25rem}
.breadcrumb-item+.breadcrumb-item::before{content:"/";padding:0 .5rem;color:#6c757d}
.table-responsive{display:block;width:100%;overflow-x:auto}
table,.table{width:100%;margin-bottom:1rem;border-collapse:collapse;color:inherit}
table th,table td{padding:.5rem;vertical-align:top;border-top:1px solid #dee2e6;text-align:left}
table thead th{vertical-align:bottom;border-bottom:2px solid #dee2e6}
.table-sm th,.table-sm td{padding:.3rem}.table-bordered,.table-bordered th,.table-bordered td{border:1px solid #dee2e6}
.btn{display:inline-block;padding:.3rem .7rem;border:1px solid #6c757d;border-radius:.25rem;background:#f8f9fa}
.text-success{color:#28a745!important}.text-danger{color:#dc3545!important}.text-warning{color:#b8860b!important}
.fas{font-style:normal;font-weight:700}.fa-check-circle::before{content:"\\2714"}.fa-times::before{content:"\\2718"}
.fa-exclamation-triangle::before{content:"\\26A0"}.fa-question-circle::before{content:"?"}.fa-comment::before{content:"\\1F4AC"}
.ge-index-page-table-validation-links-item{font-size:1.2rem}
@media (prefers-color-scheme: dark){body,.navbar,.card,.nav-tabs .nav-link.active{background:#212529;color:#f1f1f1}
 a{color:#6ea8fe}.alert-secondary{background:#383d41;color:#e2e3e5;border-color:#454d55}
 .card-header{background:rgba(255,255,255,.05)}.navbar-brand a img{visibility:visible!important}}
"""


def make_offline(docs_dir: Path) -> list[Path]:
    """Rewrite every page of the Data Docs site in ``docs_dir`` in place; returns the pages."""
    docs_dir = Path(docs_dir)
    pages = sorted(docs_dir.rglob("*.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        if MARK not in text:
            page.write_text(offline_page(text, os.path.relpath(docs_dir / "static" / "images", page.parent)),
                            encoding="utf-8")
    return pages


def offline_page(text: str, images: str) -> str:
    """One page without remote styles or scripts; ``images`` is the site's static/images relative to it."""
    for match in BOOTSTRAP_TABLE.finditer(text):
        text = _fill_table(text, match)
    text = SCRIPT.sub("", text)
    text = REMOTE_LINK.sub("", text)
    text = CLEAR_FILTERS.sub("", text)
    text = FOOTER.sub("", text)
    if (card := ACTIONS_CARD.search(text)) is not None:  # its only action is the filter button
        text = text[:card.start()] + text[_element_end(text, card.start()):]
    text = REMOTE_IMG.sub(lambda m: f'{m.group(1)}"{images}/{m.group(2)}"', text)
    text = REMOTE_URL.sub("none", text)
    style = f"{MARK}\n<style>{STYLE}</style>\n"
    head = re.search(r"</head\s*>", text, re.I)
    return text[:head.start()] + style + text[head.start():] if head else style + text


def _fill_table(text: str, match: re.Match) -> str:
    """The rows bootstrap-table would draw, as a static table in the page's empty <table>."""
    try:
        columns, rows = ast.literal_eval(match["columns"]), ast.literal_eval(match["data"])
    except (ValueError, SyntaxError):
        return text  # an unknown form: the table stays empty rather than the page broken
    table = re.search(rf"(<table\s+id=\"{re.escape(match['id'])}\"[^>]*>)\s*</table>", text, re.S)
    if table is None:
        return text
    head = "".join(f"<th>{html.escape(str(c.get('title', c.get('field', ''))))}</th>" for c in columns)
    body = []
    for row in rows:
        link = row.get("_table_row_link_path")
        cells = []
        for column in columns:
            value = row.get(column.get("field"), "")
            cell = value if isinstance(value, str) else html.escape(str(value))
            if link and "<a " not in cell:
                cell = f'<a href="{html.escape(link, quote=True)}">{cell}</a>'
            cells.append(f"<td>{cell}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    filled = f"{table[1]}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return text[:table.start()] + filled + text[table.end():]


def _element_end(text: str, start: int) -> int:
    """Where the <div> opening at ``start`` closes (past its ``</div>``)."""
    depth = 0
    for tag in re.finditer(r"<(/?)div\b[^>]*>", text[start:], re.I):
        depth += -1 if tag[1] else 1
        if depth == 0:
            return start + tag.end()
    return len(text)
