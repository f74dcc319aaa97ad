"""Encrypt and decrypt CKKS blocks on every core.

TenSEAL's CKKSVector operations are single-threaded and hold the GIL (measured), so threads do
not help; worker *processes* do (two processes ran ~2x on two cores). Each pool is created once
per process and key set, with the context handed to its workers once through the initializer,
and reused for every later update. Workers are *spawned*, not forked: the parent may hold torch
and SEAL thread pools that a fork would copy in a broken state. A spawned worker imports just
``fedcl.privacy.ckks._worker`` (unpickling its initializer); the package faces above it are lazy
(PEP 562), so it loads numpy and TenSEAL, never torch or Opacus (2-3 s more per worker).

Small updates stay in-process: starting workers costs about a second, more than encrypting a
small model. ``FEDCL_CKKS_WORKERS`` overrides the worker count (``1`` disables the pool).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from . import _worker
from .keys import fingerprint, public_bytes, secret_bytes

logger = logging.getLogger("fedcl.privacy.ckks")

ENV_WORKERS = "FEDCL_CKKS_WORKERS"
#: Below this many blocks (2048 slots each) encryption stays in-process.
DEFAULT_MIN_BLOCKS = 48
MAX_WORKERS = 8
CHUNKS_PER_WORKER = 4

_POOLS: dict[str, ProcessPoolExecutor] = {}
_LOCK = threading.Lock()


def available_cpus() -> int:
    """Cores this process may run on (respects CPU affinity, e.g. containers and taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_workers(num_blocks: int, workers: int | None = None, min_blocks: int | None = None) -> int:
    """How many worker processes to use for ``num_blocks`` blocks (1 = in-process)."""
    if workers is None:
        env = os.environ.get(ENV_WORKERS, "").strip()
        workers = int(env) if env else min(available_cpus(), MAX_WORKERS)
    min_blocks = DEFAULT_MIN_BLOCKS if min_blocks is None else min_blocks
    if workers <= 1 or num_blocks < max(min_blocks, 2):
        return 1
    return min(workers, num_blocks)


def _pool(ctx, workers: int) -> ProcessPoolExecutor:
    private = ctx.is_private()
    key = f"{fingerprint(ctx)}:{'secret' if private else 'public'}:{workers}"
    with _LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            data = secret_bytes(ctx) if private else public_bytes(ctx)
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker.init,
                initargs=(data,),
            )
            _POOLS[key] = pool
        return pool


def _drop(pool: ProcessPoolExecutor) -> None:
    with _LOCK:
        for key, value in list(_POOLS.items()):
            if value is pool:
                del _POOLS[key]
    pool.shutdown(wait=False, cancel_futures=True)


def _chunks(items: list, n: int) -> list[list]:
    size = max(1, -(-len(items) // n))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run(kind: str, items: list, ctx, workers: int | None, min_blocks: int | None, *args):
    n = plan_workers(len(items), workers, min_blocks)
    local = _worker.encrypt_with if kind == "encrypt" else _worker.decrypt_with
    if n > 1:
        remote = _worker.encrypt if kind == "encrypt" else _worker.decrypt
        chunks = _chunks(items, n * CHUNKS_PER_WORKER)
        pool = None
        try:
            pool = _pool(ctx, n)
            parts = pool.map(remote, chunks, *([a] * len(chunks) for a in args))
            return [x for part in parts for x in part], n
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            # A daemonic parent or an OOM-killed worker: slower in-process is still correct.
            logger.warning("CKKS worker pool failed (%s); continuing in-process", exc)
            if pool is not None:
                _drop(pool)
    return local(ctx, items, *args), 1


def encrypt_rows(
    rows: list[np.ndarray],
    ctx,
    scale: float,
    *,
    workers: int | None = None,
    min_blocks: int | None = None,
) -> tuple[list[bytes], int]:
    """Serialized ciphertexts of ``rows`` (each ≤ N/2 slots), and the worker count used."""
    return _run("encrypt", rows, ctx, workers, min_blocks, scale)


def decrypt_blocks(
    blocks: list[bytes],
    ctx,
    *,
    workers: int | None = None,
    min_blocks: int | None = None,
    complex_slots: bool = True,
) -> tuple[list[np.ndarray], int]:
    """Decrypted slot values of each block (needs the secret context), and the worker count;
    ``complex_slots`` false reads the real parts only (formats 2 and 3)."""
    return _run("decrypt", blocks, ctx, workers, min_blocks, complex_slots)


def shutdown() -> None:
    """Stop every worker pool of this process (tests, and long-lived hosts that rotate keys)."""
    with _LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)
