"""README.md to safe HTML: a tiny Markdown subset, with every character of the source escaped first.

Supported: `#`-`######` headings, fenced code blocks, `-`/`*` lists, paragraphs, inline `code` and **bold**.
No links, images or raw HTML: nothing in a README can produce a tag or an attribute of its own choosing.
"""

from __future__ import annotations

import html
import re

_INLINE_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    out = html.escape(text, quote=True)
    out = _INLINE_CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def render_readme(source: str) -> str:
    blocks: list[str] = []
    para: list[str] = []
    items: list[str] = []
    code: list[str] | None = None

    def flush() -> None:
        if para:
            blocks.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in source.replace("\r\n", "\n").split("\n"):
        if code is not None:
            if line.strip().startswith("```"):
                blocks.append(f"<pre><code>{html.escape(chr(10).join(code), quote=True)}</code></pre>")
                code = None
            else:
                code.append(line)
            continue
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            code = []
        elif m := re.match(r"^(#{1,6})\s+(.*)$", stripped):
            flush()
            level = len(m.group(1))
            blocks.append(f"<h{level}>{_inline(m.group(2).rstrip('#').strip())}</h{level}>")
        elif m := re.match(r"^[-*]\s+(.*)$", stripped):
            if para:
                flush()
            items.append(m.group(1))
        elif not stripped:
            flush()
        else:
            if items:
                flush()
            para.append(stripped)
    if code is not None:  # an unclosed fence runs to the end
        blocks.append(f"<pre><code>{html.escape(chr(10).join(code), quote=True)}</code></pre>")
    flush()
    return "\n".join(blocks)
