"""qwen3-vl: the KServe infer face; see vlm_triton.facade_model."""

import os
import site

# The stub's interpreter ignores PYTHONPATH; add its entries (and their .pth files) here.
for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(entry)

from vlm_triton.facade_model import TritonPythonModel  # noqa: F401
