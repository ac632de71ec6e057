"""MkDocs hook: a page's ``<!-- registry: KIND -->`` becomes that registry's table (name, summary,
options and defaults) at build time, so the reference pages cannot drift from the code."""

from __future__ import annotations

import re
from typing import Any

MARKER = re.compile(r"<!-- registry: (\w+) -->")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    from incremental.registry import markdown_table

    return MARKER.sub(lambda match: markdown_table(match.group(1)), markdown)
