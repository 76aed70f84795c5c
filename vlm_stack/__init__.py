"""Bringing the whole stack up: Docker Compose (GPU or CPU) or local processes."""
