"""Thin step layer: config + file I/O + MLflow for each pipeline stage (one module per MLproject entry point)."""
