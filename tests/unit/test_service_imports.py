"""The service's image holds no torch or transformers: its Triton path must import without them."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import importlib.abc, sys

class NoHeavyPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            raise ImportError(f"{name} is not in the service image")
        return None

sys.meta_path.insert(0, NoHeavyPackages())
import fastapi_app.main, fastapi_app.backends.triton, fastapi_app.metrics
app = fastapi_app.main.create_app()
print("ok", len(app.routes))
"""


def test_the_service_imports_without_torch_or_transformers():
    done = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
