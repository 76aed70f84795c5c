"""llava_stream: weights, batching, streaming; see vlm_triton.engine_model."""

import os
import site

# The stub's interpreter ignores PYTHONPATH; add its entries (and their .pth files) here.
for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(entry)

from vlm_triton.engine_model import TritonPythonModel  # noqa: F401
