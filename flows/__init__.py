"""Prefect flows wiring the tasks; the CLI that starts them."""

import components  # noqa: F401  (sets the offline switches before Prefect is imported)
