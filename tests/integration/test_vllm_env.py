"""vLLM's environment (``vlm_triton.vllm_env``) as tritonserver's Python backend runs it.

A model of this test's own, configured with ``EXECUTION_ENV_PATH`` = the stub venv, imports
vLLM and reads a BYTES and a UINT8 input: the two that tritonserver 2.51's stub reads wrong
(or dies on) when NumPy 2 comes first on the path. The model answers what it found, so the
test sees the stub's NumPy and vLLM versions and the bytes it received.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ARTIFACTS, free_ports
from vlm_triton import vllm_env
from vlm_triton.launch import TritonProcess

MODEL = "vllm_env_probe"

CONFIG = f"""
name: "{MODEL}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "text", data_type: TYPE_STRING, dims: [ 1 ] }},
  {{ name: "data", data_type: TYPE_UINT8, dims: [ -1 ] }}
]
output [ {{ name: "report", data_type: TYPE_STRING, dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
parameters {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{vllm_env.STUB}" }} }}
"""

PROBE = textwrap.dedent(
    """
    import json
    import locale

    locale.setlocale(locale.LC_CTYPE, "")  # the stub starts with the C locale; vLLM reads UTF-8 files

    import numpy as np
    import triton_python_backend_utils as pb_utils
    import vllm


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)[0]
                data = pb_utils.get_input_tensor_by_name(request, "data").as_numpy()
                report = {
                    "numpy": np.__version__,
                    "vllm": vllm.__version__,
                    "text": text.decode("utf-8"),
                    "data": data.tolist(),
                }
                out = np.array([json.dumps(report).encode()], dtype=np.object_)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("report", out)]))
            return responses
    """
)


@pytest.fixture(scope="module")
def probe_server(tmp_path_factory):
    vllm_env.ensure()  # built by `make test` (vllm-env); here only when it is missing
    repository = tmp_path_factory.mktemp("vllm-env-repository")
    (repository / MODEL / "1").mkdir(parents=True)
    (repository / MODEL / "config.pbtxt").write_text(CONFIG)
    (repository / MODEL / "1" / "model.py").write_text(PROBE)
    http, grpc, metrics = free_ports(3)
    server = TritonProcess(
        ARTIFACTS / "tritonserver-vllm-env.log",
        model_repository=repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        models=[MODEL],
    ).start()
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        server.stop()


def test_the_stub_runs_vllm_with_numpy_1_and_reads_bytes_and_uint8(probe_server):
    client = grpcclient.InferenceServerClient(probe_server.grpc_url)
    text = "une phrase accentuée, 中文"
    data = np.array([0, 1, 127, 128, 200, 255], dtype=np.uint8)
    inputs = [grpcclient.InferInput("text", [1], "BYTES"), grpcclient.InferInput("data", [len(data)], "UINT8")]
    inputs[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    inputs[1].set_data_from_numpy(data)
    result = client.infer(MODEL, inputs)
    report = json.loads(result.as_numpy("report").reshape(-1)[0])
    assert report["numpy"] == vllm_env.STUB_NUMPY.split("==")[1]
    assert report["vllm"] == vllm_env.VLLM.split("==")[1]
    assert report["text"] == text
    assert report["data"] == data.tolist()


def test_the_check_says_what_is_broken(tmp_path, monkeypatch, capsys):
    """``python -m vlm_triton.vllm_env --check`` fails loudly, naming the venv, when one is missing."""
    missing = tmp_path / "nowhere"
    monkeypatch.setattr(vllm_env, "CHECKS", {missing: "import vllm", vllm_env.STUB: vllm_env.CHECKS[vllm_env.STUB]})
    assert vllm_env.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: {missing} does not exist" in err
    assert "make vllm-env" in err
    monkeypatch.setattr(vllm_env, "CHECKS", {vllm_env.STUB: vllm_env.CHECKS[vllm_env.STUB]})
    assert vllm_env.main(["--check"]) == 0


def test_a_cuda_flavour_with_a_cpu_torch_is_called_broken(tmp_path, monkeypatch):
    """``VLLM_FLAVOR=cuda`` checks that pip gave vLLM a CUDA torch: a find-links folder or index that
    serves ``torch+cpu`` satisfies vLLM's pin with the CPU build. Here: the CPU venv, read as cuda."""
    flavour = tmp_path / "flavor"
    flavour.write_text("cuda\n")
    monkeypatch.setattr(vllm_env, "BUILT_FLAVOR", flavour)
    monkeypatch.setenv("VLLM_FLAVOR", "cuda")
    why = vllm_env.problem(vllm_env.PACKAGES)
    assert why is not None and "is a CPU build" in why and "+cpu" in why, why
    flavour.write_text("cpu\n")
    monkeypatch.setenv("VLLM_FLAVOR", "cpu")
    assert vllm_env.problem(vllm_env.PACKAGES) is None


SUBPROCESS_PROBE = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from vlm_engine.vllm_engine import keep_subprocesses_in_this_environment
if sys.argv[2] == "kept":
    keep_subprocesses_in_this_environment()
code = "import cloudpickle, torch, transformers; print(cloudpickle.__file__, torch.__file__, transformers.__file__)"
print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
"""


def test_a_python_process_vllm_starts_imports_vllms_packages_not_the_projects():
    """The stub ignores PYTHONPATH (``-I`` here, as the stub starts), but Python processes vLLM
    starts from it read tritonserver's, which lists the project's site-packages: a different
    cloudpickle there made vLLM's model-registry inspection fail. The engine keeps only this
    repository on it, so they import vLLM's own torch, transformers and cloudpickle."""
    from vlm_triton.launch import ROOT, environment

    env = environment()
    assert any("site-packages" in entry for entry in env["PYTHONPATH"].split(os.pathsep))  # what the stubs inherit
    python = str(vllm_env.python(vllm_env.STUB))

    def imported(mode: str) -> list[str]:
        run = subprocess.run(
            [python, "-I", "-c", SUBPROCESS_PROBE, str(ROOT), mode], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout.split()

    packages = str(vllm_env.site_packages(vllm_env.PACKAGES))
    assert all(path.startswith(packages) for path in imported("kept")), imported("kept")
    assert not all(path.startswith(packages) for path in imported("inherited"))  # what it would be without
