"""privacy/ stays in small modules, and every name callers import stays where it was.

The split of ``wire``, ``codec``, ``dp`` and ``ledger`` (issue 9) moved code into modules named
by concern; the old modules re-export what they defined, so ``from fedcl.privacy.ckks.wire
import X`` keeps working for every public X it had.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import fedcl.privacy
import fedcl.privacy.ckks

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450

#: Public names each module defined before the split (stdlib and numpy aliases left out).
BEFORE = {
    "fedcl.privacy.ckks.wire": """ARRAY_TARGET_BYTES BASE BITS BLOCKS BLOCK_BYTES_TOLERANCE
        BLOCK_PREFIX BLOCK_STYPE CLIP EncryptedSum EncryptedUpdate ExpectedReply FINGERPRINT FORMAT
        FORMAT_VERSION KIND KIND_AGGREGATE KIND_UPDATE LAYOUT MAGIC MAX_EXAMPLES MAX_SITES META_KEY
        PER_ARRAY SCALE_BITS SLOTS SUMMED VALUES VALUES_PER_SLOT WireMeta aggregate_from_bytes
        aggregate_to_bytes block_key blocks_per_array blocks_to_record check_meta decode_aggregate
        decode_aggregate_full encrypt_update record_blocks""",
    "fedcl.privacy.ckks.codec": """DecodedSum EncodeStats EncodedBlocks HEADER_SLOTS
        LAYOUT_VERSION Layout LayoutEntry MAX_EXACT_FLOAT_BITS MAX_FRACTION Packing check_packing
        decode_blocks decode_slots encode_blocks pack packing_for quantise slot_vector unpack""",
    "fedcl.privacy.dp": """DEFAULT_GRAD_SAMPLE_MODE DPConfigError DPHook GRAD_SAMPLE_MODES
        MECHANISM_DP_SGD SMALL_EXPECTED_BATCH SamplingPlan check_sample_rate
        choose_grad_sample_mode noise_from_spec plan_noise planned_release sampling_plan""",
    "fedcl.privacy.ledger": """ACCOUNTANTS DPRelease LEDGER_FILE LOCK_FILE LedgerEntry
        LedgerError LedgerSummary PrivacyLedger RunSpend SCHEMA_VERSION SpendDecision TaskSpend
        compose_epsilon""",
}


@pytest.mark.parametrize("module", sorted(BEFORE))
def test_every_name_is_still_importable_from_where_it_was(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in BEFORE[module].split() if not hasattr(mod, name)]
    assert missing == []


@pytest.mark.parametrize("face", [fedcl.privacy, fedcl.privacy.ckks])
def test_lazy_package_faces_resolve_every_name(face) -> None:
    assert [name for name in face.__all__ if getattr(face, name, None) is None] == []


def test_no_privacy_module_exceeds_the_size_limit() -> None:
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / "privacy").rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert too_long == {}
