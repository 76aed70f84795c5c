"""Triton's models behind NVIDIA Dynamo: a worker that registers a running tritonserver's
models with Dynamo and forwards the requests its frontend routes (``vlm_dynamo.worker``)."""
