"""``make models``: download the real weights of the chosen models into the HF cache.

Sources follow the same settings as serving (``<MODEL>_MODEL_PATH``, ``_MODEL_REVISION``,
``HF_CACHE_DIR``), so what is downloaded is what the servers load. Models whose source is
a local folder are skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vlm_engine.errors import ModelConfigError
from vlm_engine.settings import MODELS, resolve_settings


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
        if settings.model_path.startswith(("/", ".", "~")):
            continue
        downloads.append(Download(name, settings.model_path, settings.model_revision, settings.hf_cache_dir))
    return downloads


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
