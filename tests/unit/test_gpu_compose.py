"""vlm_stack/gpu_compose.py: the Compose override for one Triton per GPU (scripts/compose_test.sh
also has Compose itself read it with docker-compose.yml)."""

from __future__ import annotations

import pytest
import yaml

from vlm_stack import gpu_compose


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's !override tag (read as a plain mapping)."""


ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node, deep=True))


def device_ids(service: dict) -> list[str]:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    return device["device_ids"]


def test_one_service_per_gpu_all_named_triton(capsys):
    assert gpu_compose.main(["0,1,3"]) == 0
    text = capsys.readouterr().out
    assert "!override" in text  # the base file's "count: all" is replaced, not merged with
    services = yaml.load(text, Loader=ComposeLoader)["services"]
    assert list(services) == ["triton", "triton-gpu1", "triton-gpu3"]
    assert [device_ids(s) for s in services.values()] == [["0"], ["1"], ["3"]]
    for name, service in services.items():
        assert service["networks"]["default"]["aliases"] == ["triton"], name
    assert services["triton-gpu1"]["extends"] == {"file": "docker-compose.yml", "service": "triton"}
    assert "extends" not in services["triton"]


@pytest.mark.parametrize("gpus", [[], ["0", "0"], ["0", "a"]])
def test_bad_gpu_lists_are_refused(gpus):
    with pytest.raises(ValueError, match="distinct numbers"):
        gpu_compose.override(gpus)


def test_the_vllm_override_builds_the_gpu_image_with_vllm_and_sets_the_engine():
    with open("docker-compose.vllm.yml") as file:
        triton = yaml.safe_load(file)["services"]["triton"]
    assert triton["build"]["args"] == {"VLLM": "1", "VLLM_FLAVOR": "cuda"}
    assert triton["image"].endswith("/triton-gpu-vllm:${IMAGE_TAG:-latest}")
    assert triton["environment"]["ENGINE"] == "${ENGINE:-vllm}"
    with open("docker/Dockerfile.triton") as file:
        dockerfile = file.read()
    assert "ARG VLLM=0" in dockerfile and "-m vlm_triton.vllm_env" in dockerfile


def test_with_vllm_every_further_triton_is_built_and_set_as_the_first(capsys):
    assert gpu_compose.main(["0,1", "--vllm"]) == 0
    services = yaml.load(capsys.readouterr().out, Loader=ComposeLoader)["services"]
    parts = gpu_compose.vllm_parts()
    assert {k: services["triton-gpu1"][k] for k in parts} == parts
    assert device_ids(services["triton-gpu1"]) == ["1"]
