"""Import seams: the CLI's light paths, config validation and CKKS workers never load torch.

Each check runs in a fresh interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import fedcl.config

HEAVY = ("torch", "opacus", "flwr", "ray", "tenseal")


def _run(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a new interpreter (cwd ``tmp_path``); it prints one JSON line last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = f"sorted(m for m in {HEAVY!r} if m in sys.modules)"


def test_cli_version_and_help_load_no_torch(tmp_path: Path) -> None:
    got = _run(
        f"""
        import contextlib, io, json, sys
        from fedcl.cli.main import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes = [main(["--version"]), main(["--help"]), main(["simulate", "--help"])]
        print(json.dumps({{"codes": codes, "out": out.getvalue(), "loaded": {LOADED}}}))
        """,
        tmp_path,
    )
    assert got["codes"] == [0, 0, 0]
    assert "fedcl " in got["out"] and "simulate" in got["out"]
    assert got["loaded"] == []


def test_config_validation_with_he_loads_no_torch(tmp_path: Path) -> None:
    (tmp_path / "exp.toml").write_text("[he]\nenabled = true\nmax_sites = 8\n")
    got = _run(
        f"""
        import json, sys
        import fedcl.config
        from fedcl.config import ExperimentConfig, load_toml
        exp = load_toml(ExperimentConfig, "exp.toml")
        import fedcl.privacy  # the lazy package faces load nothing heavy either
        from fedcl.privacy.ckks import check_packing, packing_for
        check_packing(exp.he)
        print(json.dumps({{"max_sites": packing_for(exp.he).max_sites, "loaded": {LOADED}}}))
        """,
        tmp_path,
    )
    assert got == {"max_sites": 8, "loaded": []}


def test_simulate_refuses_a_bad_packing_before_loading_torch(tmp_path: Path) -> None:
    got = _run(
        f"""
        import contextlib, io, json, sys
        from fedcl.cli import main as cli
        cli.console.file = err = io.StringIO()
        code = cli.main(["simulate", "--set", "he.enabled=true", "--set", "he.max_sites=1000",
                         "--set", "he.values_per_slot=2", "--engine", "inprocess", "--out", "run"])
        print(json.dumps({{"code": code, "err": err.getvalue(), "loaded": {LOADED}}}))
        """,
        tmp_path,
    )
    assert got["code"] == 2
    assert "he.max_sites = 1000" in " ".join(got["err"].split())
    assert got["loaded"] == [] and not (tmp_path / "run").exists()


def test_spawned_ckks_worker_loads_no_torch(tmp_path: Path) -> None:
    got = _run(
        f"""
        import json, sys
        import torch  # the parent may hold torch; its spawned workers must not load it
        from fedcl.privacy.ckks import parallel
        from fedcl.privacy.ckks.keys import init_keys, load_secret_context
        secret = load_secret_context(init_keys("keys").secret)
        pool = parallel._pool(secret, 2)
        probe = "(lambda sys: {LOADED})(__import__('sys'))"
        loaded = [pool.submit(eval, probe).result() for _ in range(2)]
        parallel.shutdown()
        print(json.dumps({{"loaded": loaded}}))
        """,
        tmp_path,
    )
    assert got["loaded"] == [["tenseal"], ["tenseal"]]


def test_a_ledgers_epsilon_loads_no_torch_and_is_opacus_own(tmp_path: Path) -> None:
    """`fedcl site status` composes ε with Opacus' RDP analysis without importing Opacus (and
    with it torch): 0.5 s instead of 4.4 s a call."""
    got = _run(
        f"""
        import json, sys
        from fedcl.privacy.ledger import DPRelease, PrivacyLedger
        ledger = PrivacyLedger("state")
        ledger.record(DPRelease("dp-sgd", 1 / 20, 0.9, 40, 1e-5), run_id="r", task_index=0,
                      server_round=1)
        ledger.record(DPRelease("fisher", 1.0, 25.0, 1, 1e-5), run_id="r", task_index=0,
                      server_round=2)
        eps = PrivacyLedger("state").epsilon(1e-5)
        loaded = {LOADED}
        from opacus.accountants import RDPAccountant
        acc = RDPAccountant()
        acc.history = [(0.9, 1 / 20, 40), (25.0, 1.0, 1)]
        print(json.dumps({{"eps": eps, "opacus": acc.get_epsilon(1e-5), "loaded": loaded}}))
        """,
        tmp_path,
    )
    assert got["loaded"] == []
    assert got["eps"] == got["opacus"] > 0


def test_config_imports_no_other_fedcl_package() -> None:
    """``config`` sits below every other subpackage: it may import only itself."""
    offending = []
    for path in sorted(Path(next(iter(fedcl.config.__path__))).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if (name == "fedcl" or name.startswith("fedcl.")) and not (
                    name == "fedcl.config" or name.startswith("fedcl.config.")
                ):
                    offending.append(f"{path.name}:{node.lineno}: {name}")
    assert offending == []
