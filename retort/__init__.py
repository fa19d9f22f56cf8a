"""retort: declarative LLM prompting pipelines, every model call cached in DuckDB.

    import retort
    result = retort.run("sse_cot", input=rows, models={"default": "openai:gpt-4o-mini"})
    result.table("classify").to_pandas()

See docs/python.md; `retort.api` holds the functions, imported on first use so that the
command line starts without them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Result", "Table", "__version__", "arun", "compare", "plan", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "arun", "plan", "compare", "Result", "Table"):
        from retort import api

        return getattr(api, name)
    raise AttributeError(f"module 'retort' has no attribute {name!r}")
