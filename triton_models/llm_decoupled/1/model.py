"""llm_decoupled: the chat protocol router; see vlm_triton.chat_router."""

import os
import site

# The stub's interpreter ignores PYTHONPATH; add its entries (and their .pth files) here.
for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(entry)

from vlm_triton.chat_router import TritonPythonModel  # noqa: F401
