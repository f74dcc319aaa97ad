"""The ServerApp runs without the web stack: a whole run, canary on, loads no dashboard code.

Model-version policy (the canary) lives in ``server/``; the dashboard is its own process over the
same registry. Checked in a fresh interpreter, since other tests import the dashboard.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from federation_helpers import run_inprocess, small_experiment

exp = small_experiment("digits-domain-il", "canary_max_drop=0.1", "train.rounds_per_task=1")
status, _, _ = run_inprocess(exp, Path({tmp!r}))
web = sorted(
    m for m in sys.modules
    if m.startswith(("fedcl.server.dashboard", "jinja2", "prometheus_client"))
)
print(json.dumps({{"status": status, "web": web, "canary": "fedcl.server.canary" in sys.modules}}))
"""


def test_a_run_with_the_canary_loads_no_dashboard_module(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parent)
    code = SCRIPT.format(tests=tests, tmp=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed"
    assert result["canary"] is True  # the canary rule did run
    assert result["web"] == []
