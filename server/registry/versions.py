"""Model versions: the registry rows behind the artifact files, and their rollout status.

A version is saved as a ``candidate``; promotion to ``production`` archives the run's previous
production version, so "the production model of a run" is always unambiguous, and a
``rolled_back`` version is never picked up again by a resumed run. Only a version of kind
``model`` has a rollout: a Fisher or a release cannot be promoted (a promoted Fisher once
archived the real production model, and the coordinator ignored it, leaving the run without one).
"""

from __future__ import annotations

from sqlalchemy import select

from fedcl.config.vocabulary import VersionKind, VersionState

from .artifacts import read_verified, sha256_of, write_atomic
from .audit import add_audit
from .core import RegistryCore, get_round, get_run
from .errors import RegistryError
from .info import ModelVersionInfo
from .models import ModelVersion, utcnow
from .validation import (
    VERSION_KINDS,
    VERSION_STATUSES,
    check_format,
    check_run_id,
    check_value,
)


class ModelVersions(RegistryCore):
    """Saving, finding and loading model versions, and changing their status."""

    def save_model_version(
        self,
        run_id: str,
        round_id: int | None,
        *,
        task_index: int,
        server_round: int,
        payload: bytes,
        encrypted: bool,
        format: str,
        kind: str = VersionKind.MODEL,
    ) -> ModelVersionInfo:
        """Write the model to ``<artifacts>/<run>/round-<NNNNN>.<format>`` and register it.

        The file is written (atomically) before the row is committed, so a row never points at a
        half-written file. Saving the same round again replaces the candidate; a production model
        is never overwritten in place.
        """
        check_run_id(run_id)
        check_format(format)
        check_value("model version kind", kind, VERSION_KINDS)
        if server_round < 0:
            raise RegistryError(f"server_round must be >= 0, got {server_round}")
        rel = f"{run_id}/round-{server_round:05d}.{format}"
        target = self.artifacts_dir / rel
        digest = sha256_of(payload)
        with self._tx() as s:
            get_run(s, run_id)
            if round_id is not None:
                get_round(s, round_id, run_id)
            version = s.scalar(select(ModelVersion).where(ModelVersion.path == rel))
            if version is not None and version.status == VersionState.PRODUCTION:
                raise RegistryError(
                    f"refusing to overwrite production model version {version.id} at {target}"
                )
            try:
                write_atomic(target, payload)
            except OSError as exc:
                raise RegistryError(
                    f"cannot write model artifact {target}: {exc.strerror or exc}"
                ) from None
            if version is None:
                version = ModelVersion(run_id=run_id, path=rel)
                s.add(version)
            else:
                add_audit(
                    s,
                    "model_version.overwritten",
                    f"model version {version.id} at {rel} replaced "
                    f"(sha256 {version.sha256} -> {digest})",
                    run_id=run_id,
                )
            version.round_id = round_id
            version.task_index = task_index
            version.server_round = server_round
            version.sha256 = digest
            version.size_bytes = len(payload)
            version.encrypted = bool(encrypted)
            version.format = format
            version.kind = kind
            version.status = VersionState.CANDIDATE
            version.created_at = utcnow()
            s.flush()
            return ModelVersionInfo.model_validate(version)

    def latest_model_version(self, run_id: str) -> ModelVersionInfo | None:
        """The model (kind ``model``) with the highest server round, skipping rolled-back ones.

        A resumed run restarts from this model, and a model an operator rolled back must not be
        silently picked up again.
        """
        with self._tx() as s:
            version = s.scalar(
                select(ModelVersion)
                .where(
                    ModelVersion.run_id == run_id,
                    ModelVersion.kind == VersionKind.MODEL,
                    ModelVersion.status != VersionState.ROLLED_BACK,
                )
                .order_by(ModelVersion.server_round.desc(), ModelVersion.id.desc())
                .limit(1)
            )
            return None if version is None else ModelVersionInfo.model_validate(version)

    def has_production_model(self, run_id: str) -> bool:
        """Whether the run has a model version in production (one indexed probe: the production
        rule asks it after every round, and listing every version made that quadratic)."""
        with self._tx() as s:
            found = s.scalar(
                select(ModelVersion.id)
                .where(
                    ModelVersion.run_id == run_id,
                    ModelVersion.kind == VersionKind.MODEL,
                    ModelVersion.status == VersionState.PRODUCTION,
                )
                .limit(1)
            )
            return found is not None

    def list_model_versions(self, run_id: str | None = None) -> list[ModelVersionInfo]:
        """Model versions of one run (or all runs), in server-round order."""
        with self._tx() as s:
            query = select(ModelVersion)
            if run_id is not None:
                query = query.where(ModelVersion.run_id == run_id)
            query = query.order_by(ModelVersion.run_id, ModelVersion.server_round, ModelVersion.id)
            return [ModelVersionInfo.model_validate(v) for v in s.scalars(query)]

    def get_model_version(self, version_id: int) -> ModelVersionInfo | None:
        """One model version by id."""
        with self._tx() as s:
            version = s.get(ModelVersion, version_id)
            return None if version is None else ModelVersionInfo.model_validate(version)

    def load_artifact(self, version: ModelVersionInfo | int) -> bytes:
        """Read a model's bytes, refusing to return anything whose SHA-256 does not match.

        A silently corrupted (or swapped) model file would otherwise be deployed or resumed from.
        """
        if isinstance(version, int):
            found = self.get_model_version(version)
            if found is None:
                raise RegistryError(f"unknown model version {version}")
            version = found
        return read_verified(self.artifacts_dir / version.path, version)

    def set_version_status(self, version_id: int, status: str, *, actor: str) -> ModelVersionInfo:
        """Change a model version's status and audit who did it.

        Promoting to production archives the run's previous production version, so "the
        production model of a run" is always unambiguous.
        """
        check_value("model version status", status, VERSION_STATUSES)
        if not actor:
            raise RegistryError("set_version_status needs a non-empty actor for the audit log")
        with self._tx() as s:
            version = s.get(ModelVersion, version_id)
            if version is None:
                raise RegistryError(f"unknown model version {version_id}")
            if version.status == status:
                return ModelVersionInfo.model_validate(version)
            if status != VersionState.CANDIDATE and version.kind != VersionKind.MODEL:
                raise RegistryError(
                    f"model version {version_id} is a {version.kind}, not a model: only models "
                    f"have a rollout (it cannot become {status})"
                )
            if status == VersionState.PRODUCTION:
                previous = s.scalars(
                    select(ModelVersion).where(
                        ModelVersion.run_id == version.run_id,
                        ModelVersion.status == VersionState.PRODUCTION,
                        ModelVersion.id != version.id,
                    )
                ).all()
                for other in previous:
                    other.status = VersionState.ARCHIVED
                    add_audit(
                        s,
                        "model_version.status",
                        f"model version {other.id} (run {other.run_id!r}, server round "
                        f"{other.server_round}): production -> archived "
                        f"(superseded by version {version.id})",
                        run_id=other.run_id,
                        actor=actor,
                    )
            old = version.status
            version.status = status
            add_audit(
                s,
                "model_version.status",
                f"model version {version.id} (run {version.run_id!r}, server round "
                f"{version.server_round}): {old} -> {status}",
                run_id=version.run_id,
                actor=actor,
            )
            return ModelVersionInfo.model_validate(version)

    def release_model_version(
        self, version_id: int, *, payload: bytes, site_id: str, actor: str
    ) -> ModelVersionInfo:
        """Store a site's decrypted copy of encrypted model version ``version_id`` and audit it.

        The coordinator cannot decrypt (docs/DESIGN.md §4), so a site administrator does it with
        the site's secret context and hands the plaintext (safetensors) back: a new version of
        kind ``release`` that names its source, beside it in the artifacts folder. Releasing the
        same version again replaces the file and says so in the audit log.
        """
        if not actor:
            raise RegistryError("release_model_version needs a non-empty actor for the audit log")
        with self._tx() as s:
            source = s.get(ModelVersion, version_id)
            if source is None:
                raise RegistryError(f"unknown model version {version_id}")
            if source.kind != VersionKind.MODEL or not source.encrypted:
                what = "plaintext" if not source.encrypted else f"a {source.kind}"
                raise RegistryError(
                    f"model version {version_id} is {what}: only an encrypted model version is "
                    "released (a plaintext one downloads as it is)"
                )
            rel = f"{source.run_id}/round-{source.server_round:05d}.release-{source.id}.safetensors"
            digest = sha256_of(payload)
            try:
                write_atomic(self.artifacts_dir / rel, payload)
            except OSError as exc:
                raise RegistryError(
                    f"cannot write released model {self.artifacts_dir / rel}: {exc.strerror or exc}"
                ) from None
            release = s.scalar(select(ModelVersion).where(ModelVersion.path == rel))
            again = release is not None
            if release is None:
                release = ModelVersion(run_id=source.run_id, path=rel)
                s.add(release)
            release.round_id = source.round_id
            release.task_index = source.task_index
            release.server_round = source.server_round
            release.sha256 = digest
            release.size_bytes = len(payload)
            release.encrypted = False
            release.format = "safetensors"
            release.kind = VersionKind.RELEASE
            release.released_from = source.id
            release.status = VersionState.CANDIDATE
            release.created_at = utcnow()
            s.flush()
            add_audit(
                s,
                "model_version.released",
                f"site {site_id} released model version {source.id} (run {source.run_id!r}, "
                f"server round {source.server_round}, {source.status}) decrypted as version "
                f"{release.id}: sha256 {digest}" + (" (released again: replaced)" if again else ""),
                run_id=source.run_id,
                site_id=site_id,
                actor=actor,
            )
            return ModelVersionInfo.model_validate(release)
