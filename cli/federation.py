"""The federation description, the coordinator's folder and a site's state folder.

``federation.toml`` is what a coordinator writes by hand (who takes part, where the SuperLink
listens); ``fedcl coordinator init`` validates it (pydantic, ``extra="forbid"``: errors name the
file and the field) and turns it into a coordinator folder. Relative paths in it are relative to
the file's own folder. Every later coordinator command reads the folder's ``federation.json``
(the same model, paths made absolute), never the TOML again.

The SuperLink of Flower 1.41 serves its Fleet API (sites), Control API (``flwr``) and Runtime
API (its own SuperExec and ServerApp) over HTTP(S) on **one** port, ``superlink.port``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedcl.config import ConfigError, read_toml, validate_mapping

DEFAULT_SUPERLINK_PORT = 9092
REGISTRY_ENV = "FEDCL_REGISTRY_URL"
SITE_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"  # as site_id in site.toml
LOCAL_NAMES = ("127.0.0.1", "localhost")  # the SuperLink's SuperExec and `flwr` dial these


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SuperLinkSpec(_Strict):
    """``[superlink]``: where sites reach the coordinator and what the SuperLink binds."""

    #: The host name or IP address sites dial; the server certificate is issued for it.
    address: str = Field(min_length=1)
    #: The one port of Flower 1.41's SuperLink: Fleet, Control and Runtime APIs.
    port: int = Field(DEFAULT_SUPERLINK_PORT, ge=1, le=65535)
    #: The interface the SuperLink binds (0.0.0.0: all of them).
    host: str = "0.0.0.0"
    #: More names or addresses for the certificate (a second DNS name, a public IP, ...).
    sans: list[str] = Field(default_factory=list)

    @property
    def site_address(self) -> str:
        """``host:port`` as sites dial it (brackets around an IPv6 literal)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def local_address(self) -> str:
        """``host:port`` the coordinator's own ``flwr`` uses (127.0.0.1 behind 0.0.0.0)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{host}:{self.port}"

    @property
    def certificate_names(self) -> list[str]:
        names = [self.address, *self.sans, *LOCAL_NAMES]
        if self.host not in ("0.0.0.0", "::"):
            names.append(self.host)
        return list(dict.fromkeys(names))


class SiteEntry(_Strict):
    """``[[sites]]``: one enrolled site and the public key it sent (``node.pub``)."""

    id: str = Field(min_length=1, pattern=SITE_ID_PATTERN)
    public_key: Path


class FederationSpec(_Strict):
    """``federation.toml``."""

    #: Also the name of the SuperLink connection in ``$FLWR_HOME/config.toml``.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    #: The experiment sites check their data against (it goes into every bundle).
    experiment: Path
    #: Registry URL (default: a SQLite file in the coordinator folder).
    registry: str | None = None
    #: A key set from `fedcl keys init` (a folder with secret.ctx and public.ctx); without it,
    #: `fedcl coordinator init` makes one when the experiment sets he.enabled.
    keys: Path | None = None
    superlink: SuperLinkSpec
    sites: list[SiteEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_sites(self) -> FederationSpec:
        ids = [s.id for s in self.sites]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"site ids {dupes} appear more than once in [[sites]]")
        return self

    def resolved(self, base: Path) -> FederationSpec:
        """The same description with every path made absolute against ``base``."""

        def absolute(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        return self.model_copy(
            update={
                "experiment": absolute(self.experiment),
                "keys": absolute(self.keys) if self.keys else None,
                "sites": [
                    s.model_copy(update={"public_key": absolute(s.public_key)}) for s in self.sites
                ],
            }
        )


def load_federation(path: Path) -> FederationSpec:
    """Validate ``federation.toml``; paths become absolute, public keys must be Flower's kind."""
    from .tls import check_node_public_key

    spec = validate_mapping(FederationSpec, read_toml(path), str(path)).resolved(
        path.resolve().parent
    )
    seen: dict[str, str] = {}
    for i, site in enumerate(spec.sites):
        line = check_node_public_key(site.public_key, f"{path}: field 'sites.{i}.public_key'")
        key = " ".join(line.split()[:2])  # without the comment
        if key in seen:
            raise ConfigError(
                f"{path}: field 'sites.{i}.public_key': site {site.id!r} sent the same key as "
                f"site {seen[key]!r}; every site needs its own `fedcl site init`"
            )
        seen[key] = site.id
    if not spec.experiment.is_file():
        raise ConfigError(f"{path}: field 'experiment': {spec.experiment} does not exist")
    if spec.keys is not None and not (spec.keys / "public.ctx").is_file():
        raise ConfigError(
            f"{path}: field 'keys': {spec.keys} has no public.ctx (make the key set with "
            "`fedcl keys init --out DIR`)"
        )
    return spec


class CoordinatorDir:
    """The folder `fedcl coordinator init` writes and every other coordinator command reads."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    spec_file = property(lambda self: self.root / "federation.json")
    tls = property(lambda self: self.root / "tls")
    ca_cert = property(lambda self: self.tls / "ca.crt")
    server_cert = property(lambda self: self.tls / "server.crt")
    server_key = property(lambda self: self.tls / "server.key")
    nodes = property(lambda self: self.root / "nodes")
    public_ctx = property(lambda self: self.root / "public.ctx")
    bundles = property(lambda self: self.root / "bundles")
    superlink = property(lambda self: self.root / "superlink")
    runs = property(lambda self: self.root / "runs")
    artifacts = property(lambda self: self.root / "artifacts")

    def node_key(self, site_id: str) -> Path:
        return self.nodes / f"{site_id}.pub"

    def federation(self) -> FederationSpec:
        if not self.spec_file.is_file():
            raise ConfigError(
                f"{self.root} is not a coordinator folder (no federation.json): create it with "
                "`fedcl coordinator init FEDERATION.toml --out DIR`"
            )
        return FederationSpec.model_validate_json(self.spec_file.read_text())

    def registry_url(self, spec: FederationSpec | None = None) -> str:
        """``$FEDCL_REGISTRY_URL``, else the federation's ``registry``, else ``registry.db`` here.

        The variable keeps a password out of ``federation.json`` (which may sit in a ConfigMap).
        """
        import os

        spec = spec or self.federation()
        env = os.environ.get(REGISTRY_ENV)
        return env or spec.registry or f"sqlite:///{self.root / 'registry.db'}"


class BundleSpec(_Strict):
    """``superlink.toml`` in a site bundle: which federation, which SuperLink, which site."""

    federation: str
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    superlink: str


class SiteDir:
    """A site's state folder: site.toml, the node key pair, the bundle, the supervisor's files."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    site_toml = property(lambda self: self.root / "site.toml")
    node_key = property(lambda self: self.root / "node.key")
    node_pub = property(lambda self: self.root / "node.pub")
    bundle = property(lambda self: self.root / "bundle")
    ca_cert = property(lambda self: self.bundle / "ca.crt")
    secret_ctx = property(lambda self: self.bundle / "secret.ctx")
    experiment = property(lambda self: self.bundle / "experiment.toml")
    bundle_spec_file = property(lambda self: self.bundle / "superlink.toml")
    supervisor = property(lambda self: self.root / "supernode")

    def require_site(self) -> None:
        if not self.site_toml.is_file():
            raise ConfigError(
                f"{self.root} is not a site state folder (no site.toml): create it with "
                "`fedcl site init STATE_DIR --site-id ID`"
            )

    def bundle_spec(self) -> BundleSpec:
        if not self.bundle_spec_file.is_file():
            raise ConfigError(
                f"{self.root} has no coordinator bundle yet: install the folder the coordinator "
                f"sent with `fedcl site bundle {self.root} BUNDLE_DIR`"
            )
        return validate_mapping(
            BundleSpec, read_toml(self.bundle_spec_file), str(self.bundle_spec_file)
        )


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
