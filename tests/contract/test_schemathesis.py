"""The API contract: schemathesis, with every check, against the real service behind nginx.

It reads the stack's ``/openapi.json`` and sends valid and invalid requests to every
operation (coverage, fuzzing, stateful phases); real images come from the custom formats in
``schemathesis_hooks``. Any 5xx, undeclared status, schema mismatch, valid request refused
or invalid one accepted fails the test.

The seed is fixed (``CONTRACT_SEED``), so a clean clone gets the same requests and the same
verdict every run; ``make contract-fuzz`` runs with new seeds to look for what this one misses,
and prints the seed of any failure to replay it here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ARTIFACTS, ROOT

HERE = Path(__file__).resolve().parent
EXAMPLES = os.environ.get("CONTRACT_EXAMPLES", "100")
SEED = os.environ.get("CONTRACT_SEED", "20261207")  # "random": a new seed each run


def test_schemathesis_finds_no_contract_failure_through_nginx(stack):
    report = ARTIFACTS / "schemathesis"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml")),
        *("run", f"{stack.url}/openapi.json", "--checks", "all", "--max-examples", EXAMPLES),
        *("--request-timeout", "60", "--no-color", "--output-truncate", "true"),
        *("--report", "junit", "--report-dir", str(report)),
        # no examples kept from earlier runs: a seed gives the same requests on every machine
        *("--generation-database", "none"),
        *(() if SEED == "random" else ("--seed", SEED)),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.contract.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=1200)
    (ARTIFACTS / "schemathesis.log").write_text(run.stdout + run.stderr)
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert run.returncode == 0 and summary, f"schemathesis failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    generated, passed = map(int, summary.groups())
    assert generated == passed and generated >= 300, run.stdout[-2000:]
    assert re.search(r"Operations:\s+15 selected / 15 total", run.stdout), "an operation went missing"
