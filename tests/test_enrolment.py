"""Enrolment without processes: site state folders, the coordinator's TLS and bundles, the checks
`coordinator run` and `site check` make before anything starts, and what the deployment never
installs. Every command runs through ``fedcl.cli.main.main`` as a user would call it.
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedcl.cli.main import main

EXPERIMENT = """
name = "enrol"
min_sites = 3
[model]
name = "mlp"
[data]
dataset = "digits"
num_tasks = 2
[dp]
epsilon = 8.0
[he]
enabled = true
public_context = "coordinator/public.ctx"
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def federation_files(tmp_path: Path, *, n: int = 3, extra: str = "") -> Path:
    """Three enrolled sites, an experiment and federation.toml; returns the federation file."""
    lines = ['name = "enrol"', 'experiment = "experiment.toml"', extra, "[superlink]"]
    lines += ['address = "coord.example.org"', 'sans = ["10.0.0.5"]', "port = 19092"]
    for i in range(n):
        assert main(["site", "init", str(tmp_path / f"site-{i}"), "--site-id", f"h{i}"]) == 0
        lines += ["[[sites]]", f'id = "h{i}"', f'public_key = "site-{i}/node.pub"']
    (tmp_path / "experiment.toml").write_text(EXPERIMENT)
    path = tmp_path / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_site_init_writes_a_key_flower_accepts_and_never_overwrites(tmp_path, capsys) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    from fedcl.config import SiteConfig, load_toml

    state = tmp_path / "state"
    args = ["--site-id", "hospital-a", "--data", "builtin:1/3"]
    assert main(["site", "init", str(state), *args]) == 0
    printed = capsys.readouterr().out
    public = (state / "node.pub").read_text().strip()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public in printed
    assert mode(state) == 0o700 and mode(state / "node.key") == 0o600
    key = load_ssh_private_key((state / "node.key").read_bytes(), None)  # as flower-supernode
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(state / "node.pub")  # as `flwr supernode register`
    site = load_toml(SiteConfig, state / "site.toml")
    assert site.site_id == "hospital-a" and site.state_dir == state
    assert site.data.partition.index == 1 and site.privacy.epsilon_budget == 8.0
    assert site.key_path == state / "bundle" / "secret.ctx"
    before = (state / "node.key").read_bytes()
    assert main(["site", "init", str(state), "--site-id", "hospital-a"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (state / "node.key").read_bytes() == before


def test_coordinator_init_chain_sans_modes_and_refusal(tmp_path, capsys) -> None:
    from fedcl.cli.tls import certificate_sans, issued_by
    from fedcl.privacy.ckks.keys import key_file_info

    fed = federation_files(tmp_path)
    out = tmp_path / "coordinator"
    assert main(["coordinator", "init", str(fed), "--out", str(out)]) == 0
    tls = out / "tls"
    assert issued_by(tls / "server.crt", tls / "ca.crt")
    assert not issued_by(tls / "ca.crt", tls / "server.crt")
    assert set(certificate_sans(tls / "server.crt")) == {
        "coord.example.org", "10.0.0.5", "127.0.0.1", "localhost"
    }  # fmt: skip
    for secret in (tls / "ca.key", tls / "server.key"):
        assert mode(secret) == 0o600
    assert key_file_info(out / "public.ctx").kind == "public"
    for i in range(3):
        bundle = out / "bundles" / f"h{i}"
        assert sorted(p.name for p in bundle.iterdir()) == [
            "ca.crt", "experiment.toml", "secret.ctx", "superlink.toml"
        ]  # fmt: skip
        assert mode(bundle / "secret.ctx") == 0o600 and mode(bundle) == 0o700
        assert key_file_info(bundle / "secret.ctx").kind == "secret"
        assert (bundle / "ca.crt").read_bytes() == (tls / "ca.crt").read_bytes()
        manifest = tomllib.loads((bundle / "superlink.toml").read_text())
        assert manifest == {"federation": "enrol", "site_id": f"h{i}",
                            "superlink": "coord.example.org:19092"}  # fmt: skip
    assert not list(out.rglob("*.tmp*")) and not (out / ".keys").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    stamp = (tls / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["coordinator", "init", str(fed), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tls / "ca.key").read_bytes() == stamp


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("port = 19092", "prot = 19092"), "field 'superlink.prot': unknown key"),
        (("port = 19092", "port = 70000"), "field 'superlink.port'"),
        (('id = "h1"', 'id = "h0"'), "appear more than once"),
        (('"site-2/node.pub"', '"experiment.toml"'), "field 'sites.2.public_key'"),
        (('"site-1/node.pub"', '"site-0/node.pub"'), "field 'sites.1.public_key'"),
        (('experiment = "experiment.toml"', 'experiment = "nope.toml"'), "field 'experiment'"),
    ],
)
def test_federation_errors_name_file_and_field(tmp_path, capsys, change, expected) -> None:
    fed = federation_files(tmp_path)
    fed.write_text(fed.read_text().replace(*change))
    capsys.readouterr()
    assert main(["coordinator", "init", str(fed), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert str(fed) in err.replace("\n", "") and expected in err.replace("\n", "")
    assert "Traceback" not in err and not (tmp_path / "c").exists()


def test_no_package_confusion(tmp_path) -> None:
    """The app declares no dependency, the SuperLink never installs any, the dist is ours."""
    from fedcl.cli.federation import CoordinatorDir, FederationSpec
    from fedcl.cli.flower_app import write_flower_app
    from fedcl.cli.superlink import superlink_argv
    from fedcl.config import ExperimentConfig

    app = write_flower_app(ExperimentConfig(), tmp_path / "a", registry_url="sqlite://", run_id="r")
    project = tomllib.loads(app.read_text())["project"]
    assert project["dependencies"] == []
    spec = FederationSpec.model_validate(
        {"name": "f", "experiment": "e.toml", "superlink": {"address": "a", "port": 9100},
         "sites": [{"id": "s", "public_key": "s.pub"}]}
    )  # fmt: skip
    argv = superlink_argv(CoordinatorDir(tmp_path), spec)
    assert "--disable-runtime-dependency-installation" in argv
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    for flag, value in (("--host", "0.0.0.0"), ("--port", "9100")):
        assert argv[argv.index(flag) + 1] == value
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert Path(argv[argv.index(flag) + 1]).parent == tmp_path / "tls"
    root = Path(__file__).resolve().parents[1]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"] == (
        "fedcl-framework"
    )


def test_bundle_belongs_to_its_site(tmp_path, capsys) -> None:
    fed = federation_files(tmp_path)
    assert main(["coordinator", "init", str(fed), "--out", str(tmp_path / "coordinator")]) == 0
    bundles = tmp_path / "coordinator" / "bundles"
    capsys.readouterr()
    assert main(["site", "bundle", str(tmp_path / "site-0"), str(bundles / "h1")]) == 2
    assert "bundle of site 'h1'" in capsys.readouterr().err
    assert main(["site", "bundle", str(tmp_path / "site-0"), str(bundles / "h0")]) == 0
    assert mode(tmp_path / "site-0" / "bundle" / "secret.ctx") == 0o600
    assert main(["site", "bundle", str(tmp_path / "site-0"), str(bundles / "h0")]) == 2
    assert main(["site", "bundle", str(tmp_path / "site-0"), str(bundles / "h0"), "--force"]) == 0


def test_site_check_catches_what_rounds_would_refuse(tmp_path, capsys) -> None:
    from fedcl.config import PrivacyPolicy

    state = tmp_path / "site"
    data = tmp_path / "images"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
    from PIL import Image

    Image.new("L", (8, 8)).save(data / "cat" / "a.png")  # dog/ stays empty
    assert main(["site", "init", str(state), "--site-id", "s", "--data", str(data),
                 "--epsilon-budget", "4"]) == 0  # fmt: skip
    exp = tmp_path / "exp.toml"
    exp.write_text(
        'name = "x"\n[data]\ndataset = "folder"\nclass_names = ["cat", "dog"]\nimage_size = 8\n'
        "channels = 1\nnum_tasks = 1\n[dp]\nepsilon = 8.0\n[he]\nenabled = true\n"
    )
    capsys.readouterr()
    assert main(["site", "check", str(state), "--experiment", str(exp)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    site_toml = str(state / "site.toml")
    budget = f"{site_toml}: field 'privacy.epsilon_budget': 4 is below the experiment's dp.epsilon"
    assert budget in err
    assert f"{site_toml}: field 'key_path'" in err and "is not a file" in err
    assert "class folder" in err and "dog has no images" in err
    assert "Traceback" not in err
    if "require_dp" in PrivacyPolicy.model_fields:  # the site's policy (config/site.py)
        text = (state / "site.toml").read_text()
        text = text.replace("\n[privacy]\n", "\n[privacy]\nrequire_dp = true\n")
        (state / "site.toml").write_text(text)
        exp.write_text(exp.read_text().replace("[dp]\nepsilon = 8.0\n", ""))
        assert main(["site", "check", str(state), "--experiment", str(exp)]) == 2
        assert "field 'privacy.require_dp'" in capsys.readouterr().err.replace("\n", "")


def test_run_refuses_before_submitting(tmp_path, capsys) -> None:
    fed = federation_files(tmp_path)
    folder = tmp_path / "coordinator"
    assert main(["coordinator", "init", str(fed), "--out", str(folder)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(EXPERIMENT.replace("min_sites = 3", "min_sites = 4").replace(
        'public_context = "coordinator/public.ctx"', ""))  # fmt: skip
    capsys.readouterr()
    assert main(["coordinator", "run", str(bad), "-d", str(folder)]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert f"{bad}: field 'min_sites': the run waits for 4 sites" in err
    assert f"{bad}: field 'he.public_context'" in err and str(folder / "public.ctx") in err
    assert "Traceback" not in err
    assert list((folder / "runs").iterdir()) == []  # nothing was submitted
    # A good experiment gets as far as the SuperLink, which is not up here.
    assert main(["coordinator", "run", str(tmp_path / "experiment.toml"), "-d", str(folder)]) == 2
    assert "coordinator up" in capsys.readouterr().err


def test_a_failing_server_app_leaves_a_failed_run(tmp_path) -> None:
    from fedcl.server.app import app
    from fedcl.server.registry import Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    context = SimpleNamespace(
        run_config={"experiment": '{"he": {"enabled": true}}', "registry-url": url,
                    "run-id": "broken-1"}
    )  # fmt: skip
    with pytest.raises(Exception, match="public_context"):
        app._main(None, context)
    with Registry.open(url) as reg:
        run = reg.get_run("broken-1")
    assert run.status == "failed" and "he.public_context" in run.reason


def test_flwr_connection_keeps_the_rest(tmp_path, monkeypatch) -> None:
    from fedcl.cli.federation import CoordinatorDir
    from fedcl.cli.superlink import write_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text('[superlink.other]\naddress = "x:1"\n')
    fed = federation_files(tmp_path, extra='registry = "sqlite:///r.db"')
    folder = tmp_path / "coordinator"
    assert main(["coordinator", "init", str(fed), "--out", str(folder)]) == 0
    path = write_connection(CoordinatorDir(folder), CoordinatorDir(folder).federation())
    data = tomllib.loads(path.read_text())["superlink"]
    assert data["other"] == {"address": "x:1"}
    assert data["enrol"] == {
        "address": "0.0.0.0:19092".replace("0.0.0.0", "127.0.0.1"),
        "root-certificates": str(folder / "tls" / "ca.crt"),
    }


def test_supervisor_turns_flower_errors_into_reasons(tmp_path) -> None:
    from fedcl.cli.federation import SiteDir
    from fedcl.cli.supernode import explain

    site = SiteDir(tmp_path)
    tls = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer"
    assert "not signed by the CA" in explain(tls, site, "h:1")
    assert "refused this site's key" in explain(
        "[code: 2004] Failed to activate SuperNode.", site, "h:1"
    )
    assert "nothing listens at h:1" in explain("[Errno 111] Connection refused", site, "h:1")


def test_resume_checks_the_run_it_continues(tmp_path) -> None:
    from fedcl.cli.federation import CoordinatorDir
    from fedcl.cli.run_cmd import resolve
    from fedcl.config import ConfigError
    from fedcl.continual.plan import resolve_evaluation_noise
    from fedcl.server.registry import Registry

    fed = federation_files(tmp_path)
    assert main(["coordinator", "init", str(fed), "--out", str(tmp_path / "coordinator")]) == 0
    folder = CoordinatorDir(tmp_path / "coordinator")
    experiment = tmp_path / "experiment.toml"
    exp, run_id = resolve(folder, experiment, None, None)
    assert run_id.startswith("enrol-") and exp.he.public_context == str(folder.public_ctx)
    assert exp.he.fingerprint  # pinned from public.ctx, so both ends check the key set
    # What the coordinator records: the experiment with the defaults it states (the DP
    # evaluation's σ, chosen from the method table) written in; the file leaves them unset.
    stored = resolve_evaluation_noise(exp)
    assert exp.dp.evaluation_noise_multiplier is None
    assert stored.dp.evaluation_noise_multiplier is not None
    with Registry.open(folder.registry_url()) as reg:
        reg.create_run("r1", name="enrol", scenario="deployment",
                       config=stored.model_dump(mode="json"), tasks=["a", "b"])  # fmt: skip
    assert resolve(folder, None, None, "r1") == (stored, "r1")  # the stored experiment
    assert resolve(folder, experiment, None, "r1") == (exp, "r1")  # the same file resumes it
    changed = tmp_path / "changed.toml"
    changed.write_text(EXPERIMENT + "[train]\nlr = 0.5\n")
    with pytest.raises(ConfigError, match="differs from the run's experiment in train"):
        resolve(folder, changed, None, "r1")
    with pytest.raises(ConfigError, match="continue it with --resume"):
        resolve(folder, experiment, "r1", None)
    with Registry.open(folder.registry_url()) as reg:
        reg.set_run_status("r1", "completed")
    with pytest.raises(ConfigError, match="already completed"):
        resolve(folder, None, None, "r1")
