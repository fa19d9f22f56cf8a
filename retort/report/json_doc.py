"""The report as JSON, for machines: everything the other formats show, and the caller's `details`."""

from __future__ import annotations

import json

from retort.report.model import Report


def render(r: Report, indent: int | None = 2) -> str:
    return json.dumps(r.to_dict(), indent=indent, ensure_ascii=False, default=str)
