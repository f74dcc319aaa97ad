"""Enrolment: a site makes its state folder and key pair, the coordinator its TLS and bundles.

The shape Flower and NVFlare operators know: each site generates its own SuperNode key pair and
sends only the public half; the coordinator turns the list of enrolled sites into its TLS
material and one bundle per site (the CA certificate, where the SuperLink is, the experiment,
and the CKKS secret key when the experiment encrypts), delivered out of band. Nothing is ever
overwritten: re-enrolling means a new folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig, load_toml

from .checks import check_experiment
from .federation import BundleSpec, CoordinatorDir, FederationSpec, SiteDir, load_federation
from .tls import make_node_keys, make_tls, write_private, write_public

POLICY_FIELDS = ("require_dp", "min_noise_multiplier", "max_epsilon_per_run")


# --- the site ----------------------------------------------------------------------------------
def parse_data(spec: str | None) -> dict:
    """``--data``: a folder or CSV manifest, ``builtin`` or ``builtin:INDEX/NUM_SITES``."""
    if spec is None or spec == "builtin":
        return {"source": "builtin"}
    if spec.startswith("builtin:"):
        shard = spec.removeprefix("builtin:")
        try:
            index, num = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ConfigError(
                f"--data {spec!r}: write builtin:INDEX/NUM_SITES, e.g. builtin:0/3"
            ) from None
        return {
            "source": "builtin",
            "partition": {"index": index, "num_sites": num, "scheme": "iid"},
        }
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"--data {spec!r}: {path} does not exist (a class folder or a CSV)")
    return {"source": "folder", "path": str(path)}


def init_site(
    state: Path,
    site_id: str,
    *,
    data: str | None = None,
    epsilon_budget: float | None = 8.0,
    delta: float = 1e-5,
) -> tuple[SiteDir, str]:
    """Create ``state`` with site.toml and the SuperNode key pair; returns (folder, public key)."""
    site = SiteDir(state)
    existing = [p for p in (site.site_toml, site.node_key, site.node_pub) if p.exists()]
    if existing:
        raise ConfigError(
            f"{site.root} is already a site state folder ({', '.join(p.name for p in existing)} "
            "exist): refusing to overwrite a site's key or its config; use a new folder"
        )
    privacy: dict = {"delta": delta}
    if epsilon_budget is not None:
        privacy["epsilon_budget"] = epsilon_budget
    config = {
        "site_id": site_id,
        "state_dir": str(site.root),
        "key_path": str(site.secret_ctx),
        "data": parse_data(data),
        "privacy": privacy,
    }
    from fedcl.config import validate_mapping

    validate_mapping(SiteConfig, config, f"fedcl site init {state}")  # errors name the option
    site.root.mkdir(parents=True, exist_ok=True)
    os.chmod(site.root, 0o700)  # the node key and the privacy ledger live here
    header = (
        "# This site's own configuration: nothing in it comes from the coordinator.\n"
        "# key_path: the CKKS secret key of the coordinator's bundle (used only when the\n"
        "# experiment sets he.enabled). [privacy]: the ε budget this site will ever spend.\n"
    )
    text = header + tomli_w.dumps(config)
    available = [f for f in POLICY_FIELDS if f in _policy_fields()]
    if available:
        text += "# policy: " + ", ".join(f"{f} = ..." for f in available) + "\n"
    write_public(site.site_toml, text.encode())
    public = make_node_keys(site.node_key, site.node_pub, comment=f"{site_id}@fedcl")
    load_toml(SiteConfig, site.site_toml)  # what the ClientApp will read
    return site, public


def _policy_fields() -> set[str]:
    from fedcl.config import PrivacyPolicy

    return set(PrivacyPolicy.model_fields)


def install_bundle(site: SiteDir, bundle: Path, *, force: bool = False) -> BundleSpec:
    """Copy the coordinator's bundle into the state folder after checking it is this site's."""
    from fedcl.config import read_toml, validate_mapping

    from .tls import check_ca_certificate

    site.require_site()
    config = load_toml(SiteConfig, site.site_toml)
    bundle = Path(bundle).resolve()
    manifest = bundle / "superlink.toml"
    if not manifest.is_file():
        raise ConfigError(f"{bundle} is not a fedcl site bundle (no superlink.toml)")
    spec = validate_mapping(BundleSpec, read_toml(manifest), str(manifest))
    if spec.site_id != config.site_id:
        raise ConfigError(
            f"{bundle} is the bundle of site {spec.site_id!r}, but {site.site_toml} is site "
            f"{config.site_id!r}: ask the coordinator for this site's bundle"
        )
    check_ca_certificate(bundle / "ca.crt")
    if site.bundle.exists():
        if not force:
            raise ConfigError(
                f"{site.bundle} exists: refusing to replace it (pass --force after a new "
                "bundle from the coordinator, e.g. a renewed certificate)"
            )
        shutil.rmtree(site.bundle)
    site.bundle.mkdir(mode=0o700)
    for name in ("ca.crt", "superlink.toml", "experiment.toml"):
        if (bundle / name).is_file():
            write_public(site.bundle / name, (bundle / name).read_bytes())
    if (bundle / "secret.ctx").is_file():
        write_private(site.secret_ctx, (bundle / "secret.ctx").read_bytes())
    return spec


# --- the coordinator ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CoordinatorInit:
    folder: CoordinatorDir
    spec: FederationSpec
    experiment: ExperimentConfig
    sans: list[str]
    fingerprint: str | None


def init_coordinator(federation: Path, out: Path) -> CoordinatorInit:
    """Validate ``federation``, then write TLS material, node keys and one bundle per site."""
    spec = load_federation(federation)
    experiment = check_experiment(
        load_toml(ExperimentConfig, spec.experiment), str(spec.experiment)
    )
    he = experiment.he.enabled
    if he and spec.keys is None and experiment.he.fingerprint:
        raise ConfigError(
            f"{spec.experiment}: field 'he.fingerprint' pins a key set, but {federation} gives "
            "no keys folder: set keys = 'DIR' (from `fedcl keys init`) in the federation file"
        )
    folder = CoordinatorDir(out)
    if folder.root.exists() and any(folder.root.iterdir()):
        raise ConfigError(
            f"{folder.root} exists and is not empty: refusing to overwrite a coordinator's "
            "certificates and keys; choose a new --out folder"
        )
    tmp = folder.root.with_name(f".{folder.root.name}.init-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    try:
        staged = CoordinatorDir(tmp)
        fingerprint = _write_all(staged, spec, experiment, federation)
        if folder.root.exists():
            folder.root.rmdir()  # empty (checked above)
        tmp.rename(folder.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CoordinatorInit(
        folder, spec, experiment, spec.superlink.certificate_names, fingerprint if he else None
    )


def _write_all(
    folder: CoordinatorDir, spec: FederationSpec, experiment: ExperimentConfig, source: Path
) -> str | None:
    folder.tls.mkdir(mode=0o700)
    make_tls(
        folder.tls,
        federation=spec.name,
        common_name=spec.superlink.address,
        sans=spec.superlink.certificate_names,
    )
    folder.nodes.mkdir()
    for site in spec.sites:
        write_public(folder.node_key(site.id), site.public_key.read_bytes())
    secret, fingerprint = _key_set(folder, spec) if experiment.he.enabled else (None, None)
    folder.bundles.mkdir(mode=0o700)
    experiment_text = spec.experiment.read_bytes()
    for site in spec.sites:
        bundle = folder.bundles / site.id
        bundle.mkdir(mode=0o700)
        write_public(bundle / "ca.crt", folder.ca_cert.read_bytes())
        manifest = BundleSpec(
            federation=spec.name, site_id=site.id, superlink=spec.superlink.site_address
        )
        write_public(bundle / "superlink.toml", tomli_w.dumps(manifest.model_dump()).encode())
        write_public(bundle / "experiment.toml", experiment_text)
        if secret is not None:
            write_private(bundle / "secret.ctx", secret)
    folder.runs.mkdir()
    folder.superlink.mkdir(mode=0o700)
    write_public(folder.spec_file, spec.model_dump_json(indent=2).encode())
    return fingerprint


def _key_set(folder: CoordinatorDir, spec: FederationSpec) -> tuple[bytes | None, str]:
    """(secret bytes for the bundles, fingerprint); public.ctx lands in the folder."""
    from fedcl.privacy.ckks.keys import init_keys, key_file_info

    if spec.keys is not None:
        public = spec.keys / "public.ctx"
        info = key_file_info(public)
        if info.kind != "public":
            raise ConfigError(f"{public} holds a secret key: the coordinator keeps public.ctx only")
        write_public(folder.public_ctx, public.read_bytes())
        secret_path = spec.keys / "secret.ctx"
        secret = None
        if secret_path.is_file():
            if key_file_info(secret_path).fingerprint != info.fingerprint:
                raise ConfigError(f"{secret_path} and {public} belong to different key sets")
            secret = secret_path.read_bytes()
        return secret, info.fingerprint
    scratch = folder.root / ".keys"
    files = init_keys(scratch)
    try:
        secret = files.secret.read_bytes()
        write_public(folder.public_ctx, files.public.read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return secret, files.fingerprint
