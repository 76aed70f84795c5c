"""``GET /v1/models/{model_id}``: one served model, as OpenAI's retrieve-model call answers."""

from __future__ import annotations

from fastapi import APIRouter, Request

from vlm_engine.errors import NotFound

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


@router.get("/models/{model_id}", operation_id="retrieve_model")
async def retrieve_model(model_id: str, request: Request):
    settings = request.app.state.settings
    if model_id not in settings.models:
        raise NotFound(f"model {model_id!r} not found; available: {', '.join(settings.models)}")
    ready = await request.app.state.backend.ready()
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "vlm-serve",
        "ready": ready.get(model_id, False),
    }
