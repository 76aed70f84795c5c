"""The service's retries walk the replicas: a replica that answers "unknown model" (what a
stopping tritonserver says while it unloads) never costs a chat when another replica serves it."""

from __future__ import annotations

import asyncio

import httpx

from fastapi_app.backends.triton import TritonBackend
from fastapi_app.settings import Settings
from tests.conftest import start_triton
from tests.fastapi_app.conftest import ApiProcess, api_env
from tests.fastapi_app.test_openai_api import vision_messages


def test_replica_clients_take_each_address_in_turn():
    settings = Settings(triton_grpc_url="ipv4:127.0.0.1:9,127.0.0.1:10,127.0.0.1:11")

    async def turns() -> list[str]:
        backend = TritonBackend(settings)
        try:
            clients = [await backend._replica_client(turn) for turn in range(7, 13)]
            address_of = {id(client): address for address, client in backend._direct.items()}
            return [address_of[id(client)] for client in clients]
        finally:
            await backend.close()

    # one client per address, kept; consecutive turns (a request's retries) go round the list
    assert [a.rsplit(":", 1)[1] for a in asyncio.run(turns())] == ["10", "11", "9", "10", "11", "9"]


def test_a_replica_without_the_model_costs_no_chat(triton, tiny_models_dir, tmp_path_factory, png):
    # the "stopping" replica: a real tritonserver that has the facade but not the stream model
    stopping = start_triton(tiny_models_dir, "tritonserver-no-stream.log", models=["llava"])
    target = f"ipv4:{stopping.grpc_url},{triton.grpc_url}"
    env = api_env(tmp_path_factory, TRITON_GRPC_URL=target, SERVED_MODELS="llava", TRITON_RETRIES="2")
    # /health: readiness asks the replicas in turn, and one of them lacks llava_stream
    api = ApiProcess("api-replica-retries", env).start(until="/health")
    try:
        body = {"model": "llava", "messages": vision_messages(png), "max_tokens": 4}

        async def chats() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=api.url, timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(16)))

        # the round-robin channel sends only to replicas it has connected to: the first round can
        # all go to one, so rounds go on (every chat answered) until the stopping one was met
        for _ in range(5):
            replies = asyncio.run(chats())
            assert [r.status_code for r in replies] == [200] * 16, [r.text for r in replies if r.status_code != 200]
            log = api.log_path.read_text(errors="replace")
            if "trying again" in log:
                break
        assert "trying again" in log and "unknown model" in log.lower()  # the stopping replica was met
    finally:
        api.stop()
        stopping.stop()
