"""CKKS key custody: file modes, secret vs public contexts, fingerprints, the ``keys`` CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tenseal as ts
from typer.testing import CliRunner

from fedcl.cli import keys_cmd
from fedcl.privacy.ckks.errors import CKKSConfigError, CKKSKeyError
from fedcl.privacy.ckks.keys import (
    PUBLIC_FILE,
    SECRET_FILE,
    describe_key_file,
    fingerprint,
    init_keys,
    key_file_info,
    load_public_context,
    load_secret_context,
)
from fedcl.privacy.ckks.params import CKKSParams, params_of


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return init_keys(tmp_path_factory.mktemp("keys"))


def test_secret_file_is_0600_and_public_file_has_no_secret_key(keys) -> None:
    assert os.stat(keys.secret).st_mode & 0o777 == 0o600
    raw = ts.context_from(keys.public.read_bytes())
    assert raw.is_private() is False
    assert raw.has_public_key()
    assert not raw.has_galois_keys() and not raw.has_relin_keys()
    assert ts.context_from(keys.secret.read_bytes()).is_private() is True


def test_coordinator_context_cannot_decrypt(keys) -> None:
    public = load_public_context(keys.public)
    assert public.is_private() is False
    vec = ts.ckks_vector(public, [1.0, 2.0], scale=2.0**18)  # it can encrypt and add...
    with pytest.raises(ValueError, match="secret"):
        (vec + vec).decrypt()  # ...but never decrypt


def test_coordinator_refuses_a_secret_context(keys) -> None:
    with pytest.raises(CKKSKeyError, match="SECRET context") as err:
        load_public_context(keys.secret)
    assert isinstance(err.value, KeyError)
    assert "public.ctx" in str(err.value)


def test_site_refuses_public_context_and_loose_file_mode(keys, tmp_path: Path) -> None:
    with pytest.raises(CKKSKeyError, match="PUBLIC context"):
        load_secret_context(keys.public)  # 0644, but it is not a secret context
    loose = tmp_path / SECRET_FILE
    loose.write_bytes(keys.secret.read_bytes())
    loose.chmod(0o640)
    with pytest.raises(CKKSKeyError, match="chmod 600"):
        load_secret_context(loose)
    loose.chmod(0o600)
    assert load_secret_context(loose).is_private()


def test_both_files_show_the_same_fingerprint(keys) -> None:
    assert describe_key_file(keys.secret) == ("secret", keys.fingerprint)
    assert describe_key_file(keys.public) == ("public", keys.fingerprint)
    assert fingerprint(load_secret_context(keys.secret)) == keys.fingerprint
    assert key_file_info(keys.public).params == CKKSParams()


def test_pinned_fingerprint_catches_another_key_set(keys, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other")
    assert other.fingerprint != keys.fingerprint
    with pytest.raises(CKKSKeyError, match="another key set"):
        load_public_context(other.public, expected_fingerprint=keys.fingerprint)
    load_public_context(keys.public, expected_fingerprint=keys.fingerprint.upper())


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = init_keys(tmp_path)
    with pytest.raises(CKKSKeyError, match="--force"):
        init_keys(tmp_path)
    second = init_keys(tmp_path, force=True)
    assert second.fingerprint != first.fingerprint
    assert os.stat(second.secret).st_mode & 0o777 == 0o600


def test_insecure_or_useless_parameters_are_refused() -> None:
    with pytest.raises(CKKSConfigError, match="128-bit"):
        CKKSParams(4096, (60, 60))  # 120 bits > 109
    with pytest.raises(CKKSConfigError, match="at least two primes"):
        CKKSParams(4096, (60,))
    with pytest.raises(CKKSConfigError, match="not supported"):
        CKKSParams(3000, (60, 49))
    assert CKKSParams(8192, (60, 40, 40, 60)).data_bits == 140


def test_params_are_read_back_from_the_context(keys) -> None:
    p = params_of(load_public_context(keys.public))
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.slots) == (4096, (60, 49), 2048)


def test_cli_init_and_show(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "k"
    result = runner.invoke(keys_cmd.app, ["init", "--out", str(out)])
    assert result.exit_code == 0, result.output
    fp = describe_key_file(out / PUBLIC_FILE)[1]
    assert fp in result.output
    for name, kind in ((SECRET_FILE, "secret"), (PUBLIC_FILE, "public")):
        shown = runner.invoke(keys_cmd.app, ["show", str(out / name)], terminal_width=200)
        assert shown.exit_code == 0, shown.output
        assert fp in shown.output and kind in shown.output and "4096" in shown.output
    again = runner.invoke(keys_cmd.app, ["init", "--out", str(out)])
    assert isinstance(again.exception, CKKSKeyError)
    assert runner.invoke(keys_cmd.app, ["init", "--out", str(out), "--force"]).exit_code == 0
    bad = runner.invoke(
        keys_cmd.app, ["init", "--out", str(tmp_path / "b"), "--poly-modulus", "2048"]
    )
    assert isinstance(bad.exception, CKKSConfigError)
