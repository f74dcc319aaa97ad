"""``fedcl keys``: create and inspect the federation's CKKS key set (docs/DESIGN.md §4).

``init`` is run once, by whoever administers the federation's keys: ``secret.ctx`` goes to every
site out of band (file mode 0600), ``public.ctx`` to the coordinator. ``show`` lets a site admin
and the coordinator admin compare fingerprints over the phone before the first round.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="CKKS keys: create a key set, show a key file's kind and fingerprint.")
console = Console()


@app.command("init")
def init(
    out: Path = typer.Option(..., "--out", "-o", help="Directory for secret.ctx and public.ctx."),
    poly_modulus: int = typer.Option(
        4096, "--poly-modulus", help="CKKS polynomial modulus degree N (N/2 values per block)."
    ),
    coeff_mod_bits: str = typer.Option(
        "60,49",
        "--coeff-mod-bits",
        help="Comma-separated prime sizes: data prime(s) then SEAL's special prime.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing key files."),
) -> None:
    """Create a new key set and print its fingerprint."""
    from fedcl.privacy.ckks.errors import CKKSConfigError
    from fedcl.privacy.ckks.keys import init_keys
    from fedcl.privacy.ckks.params import CKKSParams

    try:
        sizes = tuple(int(x) for x in coeff_mod_bits.replace(" ", "").split(",") if x)
    except ValueError:
        raise CKKSConfigError(
            f"--coeff-mod-bits {coeff_mod_bits!r}: give comma-separated integers, e.g. 60,49"
        ) from None
    files = init_keys(out, CKKSParams(poly_modulus, sizes), force=force)
    out_ = console.print
    out_(
        f"[green]secret[/] {files.secret}  (mode 0600: to every site, out of band)", soft_wrap=True
    )
    out_(f"[green]public[/] {files.public}  (for the coordinator)", soft_wrap=True)
    out_(f"parameters  {files.params.describe()}", soft_wrap=True)
    out_(f"fingerprint {files.fingerprint}", soft_wrap=True)


@app.command("show")
def show(file: Path = typer.Argument(..., help="A secret.ctx or public.ctx.")) -> None:
    """Print a key file's kind (secret/public), fingerprint and parameters."""
    from fedcl.privacy.ckks.keys import key_file_info
    from fedcl.privacy.ckks.params import SEAL_MAX_COEFF_BITS_128

    info = key_file_info(file)
    p = info.params
    table = Table(title=str(file), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, overflow="fold")
    table.add_row("kind", info.kind)
    table.add_row("poly modulus degree", str(p.poly_modulus_degree))
    table.add_row(
        "coeff modulus bits",
        f"{list(p.coeff_mod_bit_sizes)} = {sum(p.coeff_mod_bit_sizes)} "
        f"(128-bit limit {SEAL_MAX_COEFF_BITS_128.get(p.poly_modulus_degree, '?')})",
    )
    table.add_row("slots per block", f"{p.slots} (two values each: {p.block_values})")
    table.add_row("file mode", f"{info.mode:04o}")
    console.print(table)
    # On its own line, never wrapped: admins compare it character by character.
    console.print(f"fingerprint {info.fingerprint}", soft_wrap=True)
    if info.too_open:
        console.print(
            f"[bold yellow]warning:[/] {file} holds the secret key but group/others can read it; "
            f"sites refuse it until `chmod 600 {file}`"
        )
