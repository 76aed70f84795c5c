"""The model repository tritonserver reads: ``triton_models/`` as it is, or, where a model runs
vLLM's engine (``ENGINE=vllm``, ``LLAVA_ENGINE``, ``QWEN3_VL_ENGINE``), a copy that points
that model at vLLM's environment.

Triton's Python backend takes the interpreter's environment from the model's own config
(``EXECUTION_ENV_PATH``), and ``--model-config-name`` chooses one config for every model. So
the engine is chosen per model here, before tritonserver starts: a folder under
``$TRITON_HOME/repositories/`` where each native model is a link to its folder in
``triton_models/`` and each vLLM one has its config (``config.pbtxt`` and ``configs/*.pbtxt``)
with ``engine`` set to ``vllm`` and ``EXECUTION_ENV_PATH`` added, its code (``1/``) linked. The
folder is named by its content, written once and read by every server that wants the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vlm_engine.settings import MODELS, resolve_engine
from vlm_triton import vllm_env
from vlm_triton.launch import TRITON_HOME

PARAMETER = re.compile(r'parameters\s*\{\s*key:\s*"(?P<key>[^"]+)",\s*value:\s*\{\s*string_value:\s*"(?P<value>[^"]*)"')
ENGINE_LINE = re.compile(r'(parameters\s*\{\s*key:\s*"engine",\s*value:\s*\{\s*string_value:\s*)"[^"]*"')


def parameters(config: str) -> dict[str, str]:
    """The string ``parameters`` of a ``config.pbtxt``."""
    return {m["key"]: m["value"] for m in PARAMETER.finditer(config)}


def engines(repository: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each stream model's engine (``native`` or ``vllm``) by its Triton name; raises
    ``ModelConfigError`` where vLLM is asked for a model it cannot run."""
    env = os.environ if env is None else env
    found = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        values = parameters(config.read_text())
        if values.get("model") in MODELS and "engine" in values:
            found[config.parent.name] = resolve_engine(values["model"], values["engine"] or "native", env)
    return found


def vllm_config(text: str, stub: Path) -> str:
    """A stream model's config text for vLLM's engine."""
    if not ENGINE_LINE.search(text):
        raise ValueError("the config has no 'engine' parameter")
    text = ENGINE_LINE.sub(r'\1"vllm"', text)
    return (
        f"{text.rstrip()}\n"
        "# ENGINE=vllm (written by vlm_triton.repository): this model's stub runs in vLLM's environment\n"
        f'parameters {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{stub}" }} }}\n'
    )


def serving_repository(repository: Path, env: Mapping[str, str] | None = None) -> Path:
    """``repository`` itself when every model is native; else the copy that runs the vLLM ones
    in vLLM's environment (which must be built: ``make vllm-env``)."""
    chosen = engines(repository, env)
    vllm_models = sorted(name for name, engine in chosen.items() if engine == "vllm")
    if not vllm_models:
        return repository
    stub = vllm_env.STUB
    if not vllm_env.python(stub).exists():
        raise SystemExit(
            f"ENGINE=vllm for {', '.join(vllm_models)}, but vLLM's environment is missing: run `make vllm-env`"
        )
    configs = {
        name: {
            path.relative_to(repository / name): vllm_config(path.read_text(), stub)
            for path in sorted((repository / name).glob("config.pbtxt"))
            + sorted((repository / name).glob("configs/*.pbtxt"))
        }
        for name in vllm_models
    }
    digest = hashlib.sha256(repr((str(repository.resolve()), str(stub), sorted(configs.items()))).encode())
    target = TRITON_HOME / "repositories" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    work.chmod(0o755)  # a container's server may read it as another user
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        if model.name not in configs:
            (work / model.name).symlink_to(model.resolve(), target_is_directory=True)
            continue
        for entry in model.iterdir():
            if entry.is_dir() and entry.name != "configs":  # the version folders: the code, linked
                (work / model.name / entry.name).parent.mkdir(parents=True, exist_ok=True)
                (work / model.name / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
        for relative, text in configs[model.name].items():
            (work / model.name / relative).parent.mkdir(parents=True, exist_ok=True)
            (work / model.name / relative).write_text(text)
    try:
        work.rename(target)
    except OSError:  # another server wrote the same one meanwhile
        shutil.rmtree(work, ignore_errors=True)
    return target
