"""Locust load tests for the vlm-serve stack: ``python -m loadtests.run`` (see loadtests/README.md)."""
