"""One page, two renderings: a list of blocks written as Markdown (figures as files beside it) and as one HTML file
(figures inlined, so the page can be shared alone).

Blocks: ("h", level, text), ("p", text), ("table", header, rows, marked) with `marked` the set of (row, column)
cells to emphasise, ("img", name, alt) naming a figure in `figures`, ("pre", text), ("details", summary, blocks).
"""

from __future__ import annotations

import base64
import html

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d2733; line-height: 1.45; }
h1 { border-bottom: 2px solid #27496d; padding-bottom: .2em; }
h2 { margin-top: 1.6em; color: #27496d; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; display: block; overflow-x: auto;
        max-width: 100%; }
th, td { border: 1px solid #ccd5df; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #dff3e3; font-weight: 600; }
td.marked { background: #fff4d6; }
img { max-width: 100%; border: 1px solid #e1e1e1; margin: .4em 0; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list, figure_dir: str) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            _, header, rows, marked = block
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            for i, row in enumerate(rows):
                cells = [f"**{_md_cell(c)}**" if (i, j) in marked and str(c) else _md_cell(c)
                         for j, c in enumerate(row)]
                out.append("| " + " | ".join(cells) + " |")
        elif kind == "img":
            out.append(f"![{block[2]}]({figure_dir}/{block[1]})")
        elif kind == "pre":
            out.append("```\n" + block[1] + "\n```")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(block[1])}</summary>\n")
            out.append(to_markdown(block[2], figure_dir))
            out.append("</details>")
        out.append("")
    return "\n".join(out)


def _is_number(text) -> bool:
    try:
        float(str(text).replace(",", "").rstrip("%s"))
    except ValueError:
        return False
    return True


def to_html(blocks: list, figures: dict[str, bytes], title: str) -> str:
    body = _html_blocks(blocks, figures)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _html_blocks(blocks: list, figures: dict[str, bytes]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            _, header, rows, marked = block
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                       + "</tr></thead><tbody>")
            for i, row in enumerate(rows):
                cells = []
                for j, c in enumerate(row):
                    classes = [n for n, on in (("num", _is_number(c)), ("best", (i, j) in marked)) if on]
                    attr = f' class="{" ".join(classes)}"' if classes else ""
                    cells.append(f"<td{attr}>{html.escape(str(c))}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "img" and block[1] in figures:
            data = base64.b64encode(figures[block[1]]).decode("ascii")
            out.append(f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">')
        elif kind == "pre":
            out.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "details":
            inner = _html_blocks(block[2], figures)
            out.append(f"<details><summary>{html.escape(block[1])}</summary>{inner}</details>")
    return "\n".join(out)


def _inline(text: str) -> str:
    """`code` and **bold** of the Markdown paragraphs, escaped."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
