"""The faster CKKS paths of issue 14 compute exactly what the plain ones did.

* the checksum of a cached layout as one matrix product per chunk equals the per-modulus sum
  over reduced fields, worked here in Python integers from the same coefficient streams;
* seeded encryption passes its secret key and its ciphertexts through an anonymous in-memory
  file, leaving nothing in /dev/shm or the temp directory, and every block still decrypts.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import tenseal as ts

from fedcl.privacy.ckks import integrity, seeded
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.packing import checksum_moduli


def _reference(fields: np.ndarray, header: tuple[int, int], moduli, key: bytes) -> list[int]:
    """The definition, c_i = (b_i0·h0 + b_i1·h1 + Σ a_ij·f_j) mod M_i, in Python integers."""
    out = []
    for i, m in enumerate(moduli):
        b, chunks = integrity._draw(key, i, m, fields.shape[0])
        a = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
        total = int(b[0]) * header[0] + int(b[1]) * header[1]
        total += sum(int(x) * int(y) for x, y in zip(a.tolist(), fields.tolist(), strict=True))
        out.append(total % m)
    return out


@pytest.mark.parametrize(
    ("n", "field_bits"),
    [(1, 15), (16_711, 18), (70_000, 20), (3_000, 25), (3_000, 30)],  # 30: the reduced path
)
def test_checksums_match_their_definition(n: int, field_bits: int) -> None:
    rng = np.random.default_rng(n + field_bits)
    fields = rng.integers(0, 2**field_bits, n, dtype=np.int64)
    moduli = checksum_moduli(15)
    key = bytes(range(32))
    header = (5, 4321)
    want = _reference(fields, header, moduli, key)
    assert integrity.checksums(fields, header, moduli, key).tolist() == want
    assert integrity.checksums(fields, header, moduli, key).tolist() == want  # cached now
    fields[n // 2] += 1  # one field off by one: every checksum sees it
    got = integrity.checksums(fields, header, moduli, key).tolist()
    assert all(g != w for g, w in zip(got, want, strict=True))


def _leftovers() -> set[str]:
    found = set()
    for base in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(base):
            found |= {os.path.join(base, n) for n in os.listdir(base) if n.startswith("fedcl-ckks")}
    return found


def test_seeded_encryption_leaves_no_file_and_every_block_decrypts(tmp_path) -> None:
    files = init_keys(tmp_path / "keys")
    secret, public = load_secret_context(files.secret), load_public_context(files.public)
    before = _leftovers()
    enc = seeded.SeededEncryptor(secret)
    rows = [np.arange(2048, dtype=np.float64) * 7.0, np.arange(1000, dtype=np.float64)]
    for _ in range(3):  # the scratch file is reused: block sizes and contents stay right
        blocks = enc.encrypt(rows, 2.0**17)
        for row, block in zip(rows, blocks, strict=True):
            # Two slot integers per CKKS slot: 1024 and 500 CKKS slots.
            assert ts.ckks_vector_from(public, block).size() == row.shape[0] // 2
            (back,) = seeded.decryptor_for(secret).decrypt([block])
            assert np.array_equal(np.rint(back), row)
    assert _leftovers() <= before  # the secret key never lay in a named file
    scratch = enc._scratch
    if scratch._fd is not None:  # Linux: an anonymous in-memory file, truncated when closed
        assert scratch.path.startswith("/proc/self/fd/")
        fd = scratch._fd
        scratch.close()
        with pytest.raises(OSError):
            os.fstat(fd)
