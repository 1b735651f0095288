"""Thin Prefect wrappers over `components`: caching, retries, artifacts; no logic of their own."""

import components  # noqa: F401  (sets the offline switches before Prefect is imported)
