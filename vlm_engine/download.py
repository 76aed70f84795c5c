"""``make models``: download the real weights of the chosen models into the HF cache.

Sources follow the same settings as serving (``<MODEL>_MODEL_PATH``, ``_MODEL_REVISION``,
``HF_CACHE_DIR``), so what is downloaded is what the servers load. Models whose source is
a local folder are skipped. moondream2's code also fetches a tokenizer of its own
(``moondream/starmie-v1``) when it starts: it is downloaded here too, at the pinned revision,
so that the model starts offline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vlm_engine.errors import ModelConfigError
from vlm_engine.settings import MODELS, ModelSettings, resolve_settings


@dataclass(frozen=True)
class Download:
    name: str
    repo_id: str
    revision: str | None
    cache_dir: str | None


def plan(names: list[str], env: Mapping[str, str] | None = None) -> list[Download]:
    """What to download for ``names`` (all four when empty); raises on unknown names."""
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ModelConfigError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    downloads = []
    for name in names or list(MODELS):
        settings = resolve_settings(name, env=env)
        if not _is_local(settings.model_path):
            downloads.append(Download(name, settings.model_path, settings.model_revision, settings.hf_cache_dir))
        if settings.architecture == "moondream2":
            downloads += _moondream2_tokenizer(settings)
    return downloads


def _is_local(path: str) -> bool:
    return path.startswith(("/", ".", "~"))


def _moondream2_tokenizer(settings: ModelSettings) -> list[Download]:
    """The tokenizer moondream2's code fetches, unless a local copy is configured."""
    from vlm_engine.adapters.moondream2 import TOKENIZER_REPO, TOKENIZER_REVISION

    repo = settings.tokenizer_repo or TOKENIZER_REPO
    if _is_local(repo) or (Path(settings.model_path) / repo / "tokenizer.json").is_file():
        return []
    revision = settings.tokenizer_revision or TOKENIZER_REVISION
    return [Download(f"{settings.name} tokenizer", repo, revision, settings.hf_cache_dir)]


def main(argv: list[str] | None = None, download: Callable[..., str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make models", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    try:
        todo = plan(args.models)
    except ModelConfigError as exc:
        parser.error(exc.message)
    if download is None:
        from huggingface_hub import snapshot_download as download
    for item in todo:
        where = f"@{item.revision}" if item.revision else ""
        print(f"{item.name}: {item.repo_id}{where}", flush=True)
        if not args.dry_run:
            path = download(repo_id=item.repo_id, revision=item.revision, cache_dir=item.cache_dir)
            print(f"{item.name}: in {path}", flush=True)
    if not todo:
        print("nothing to download: every chosen model points at a local folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
