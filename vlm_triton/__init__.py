"""Glue between Triton's Python backend and the shared engine (imported inside the stub)."""
