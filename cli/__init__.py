"""The ``compress`` console script (Typer)."""
