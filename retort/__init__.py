"""retort: declarative LLM prompting pipelines, every model call cached in DuckDB."""

__version__ = "0.1.0"
