"""llava_stream: weights, batching, streaming; see vlm_triton.engine_model."""

import importlib.util
import os
import site
import sys
from pathlib import Path

if importlib.util.find_spec("vllm") is not None:
    # ENGINE=vllm: this stub runs in vLLM's environment (EXECUTION_ENV_PATH, vlm_triton.repository),
    # which has vLLM's packages; only this repository is added (never the project's site-packages).
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
else:
    # The stub's interpreter ignores PYTHONPATH; add its entries (and their .pth files) here.
    for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        site.addsitedir(entry)

from vlm_triton.engine_model import TritonPythonModel  # noqa: F401
