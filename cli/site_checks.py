"""What ``fedcl site check`` and ``fedcl site status`` look at.

``check`` refuses (every problem at once, naming the file and field) what would otherwise only
show up as refused or failed rounds: a privacy budget below the experiment's ``dp.epsilon`` (or
already spent), HE on without a usable secret key, an empty class folder, DP settings the site's
own policy refuses. Then it loads the data as a round would.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig, load_toml

from .checks import check_experiment
from .federation import SiteDir


def check_site(
    toml_path: Path, experiment_path: Path, site_dir: SiteDir | None
) -> tuple[SiteConfig, ExperimentConfig, list[str]]:
    """(site, experiment, notes), or a ConfigError listing every problem."""
    site = load_toml(SiteConfig, toml_path)
    exp = check_experiment(load_toml(ExperimentConfig, experiment_path), str(experiment_path))
    src, xsrc = str(toml_path), str(experiment_path)
    problems: list[str] = []
    notes: list[str] = []
    problems += _budget_problems(site, exp, src, xsrc)
    problems += _policy_problems(site, exp, src, xsrc)
    if exp.he.enabled:
        problems += _key_problems(site, exp, src)
    problems += _data_problems(site, src)
    if site_dir is not None:
        problems += _deployment_problems(site_dir, notes)
    if site.privacy.research_seed is not None:
        notes.append(
            f"{src}: privacy.research_seed is set: every DP draw and the replay key follow it, "
            "so anyone who learns it can remove this site's noise; for simulations and tests "
            "only, leave it unset on a site with real data"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    return site, exp, notes


def _budget_problems(site: SiteConfig, exp: ExperimentConfig, src: str, xsrc: str) -> list[str]:
    budget, target = site.privacy.epsilon_budget, exp.dp.epsilon
    if not exp.dp.enabled or target is None or budget is None:
        return []
    field = f"{src}: field 'privacy.epsilon_budget'"
    if budget < target:
        return [
            f"{field}: {budget:g} is below the experiment's dp.epsilon = {target:g} ({xsrc}): "
            "this site would refuse the run's rounds; raise the budget or ask the coordinator "
            "for a smaller dp.epsilon"
        ]
    from fedcl.privacy.ledger import PrivacyLedger

    spent = PrivacyLedger(site.state_dir).epsilon(site.privacy.delta)
    if budget - spent < target:
        return [
            f"{field}: {budget:g}, of which {spent:.2f} is spent (`fedcl site privacy --state "
            f"{site.state_dir}`): {budget - spent:.2f} remains, less than the experiment's "
            f"dp.epsilon = {target:g} ({xsrc})"
        ]
    return []


def _policy_problems(site: SiteConfig, exp: ExperimentConfig, src: str, xsrc: str) -> list[str]:
    """The site's own DP policy (``[privacy]``), as its rounds would apply it.

    What needs this site's data (the σ it would plan for ``dp.epsilon``, the ε a given
    ``dp.noise_multiplier`` would spend over the run) is planned as the first round would.
    """
    policy, dp, out = site.privacy, exp.dp, []
    if not dp.enabled:
        if policy.require_dp:
            out.append(
                f"{src}: field 'privacy.require_dp': this site trains only with DP-SGD (true "
                f"by default when the site sets a budget or a limit), but {xsrc} has DP "
                "off (set dp.epsilon or dp.noise_multiplier): it would refuse every round and "
                "every evaluation"
            )
        return out
    floor, cap = policy.min_noise_multiplier, policy.max_epsilon_per_run
    field_floor = f"{src}: field 'privacy.min_noise_multiplier'"
    field_cap = f"{src}: field 'privacy.max_epsilon_per_run'"
    if floor is not None and dp.noise_multiplier is not None and dp.noise_multiplier < floor:
        out.append(
            f"{field_floor}: {floor:g} is above the experiment's dp.noise_multiplier = "
            f"{dp.noise_multiplier:g} ({xsrc}): this site would refuse every training round"
        )
    if floor is not None and _consolidates(exp) and exp.continual.fisher_noise_multiplier < floor:
        out.append(
            f"{field_floor}: {floor:g} is above the experiment's continual."
            f"fisher_noise_multiplier = {exp.continual.fisher_noise_multiplier:g} ({xsrc}): this "
            "site would refuse every consolidation round"
        )
    if cap is not None and dp.epsilon is not None and dp.epsilon > cap:
        out.append(
            f"{field_cap}: {cap:g} is below the experiment's dp.epsilon = {dp.epsilon:g} "
            f"({xsrc}): this site would refuse the rounds that bring the run above {cap:g}"
        )
    given = dp.noise_multiplier is not None
    if not ((floor is not None and not given) or (given and (cap or policy.epsilon_budget))):
        return out
    privacy, problem = _planned_privacy(site, exp, xsrc)
    if problem:
        return [*out, problem]
    if privacy is None:
        return out  # the data does not load: data_table says why
    least = privacy.smallest_noise_multiplier() if not given else None
    if least is not None and floor is not None and least < floor:
        out.append(
            f"{field_floor}: {floor:g} is above the σ = {least:.3g} this site plans for the "
            f"experiment's dp.epsilon = {dp.epsilon:g} at its data ({xsrc}): it would refuse "
            "the training rounds of that task at least; ask for a smaller dp.epsilon"
        )
    if given:
        spend = privacy.planned_run_epsilon()
        what = f"the ε = {spend:.2f} that dp.noise_multiplier = {dp.noise_multiplier:g} ({xsrc})"
        if cap is not None and spend > cap:
            out.append(
                f"{field_cap}: {cap:g} is below {what} would spend over the run at this site's "
                "data: the rounds that bring the run above it would be refused"
            )
        if policy.epsilon_budget is not None:
            spent = privacy.ledger.epsilon(policy.delta)
            remaining = policy.epsilon_budget - spent
            if spend > remaining:
                out.append(
                    f"{src}: field 'privacy.epsilon_budget': {policy.epsilon_budget:g}, of which "
                    f"{spent:.2f} is spent: {remaining:.2f} remains, less than {what} would "
                    "spend over the run at this site's data"
                )
    return out


def _consolidates(exp: ExperimentConfig) -> bool:
    from fedcl.continual.methods import get_method

    return get_method(exp.continual.method).consolidates and not exp.is_joint


def _planned_privacy(site: SiteConfig, exp: ExperimentConfig, xsrc: str):
    """(SitePrivacy over this site's data, None), (None, a problem) or (None, None)."""
    from fedcl.client.privacy_site import SitePlan, SitePrivacy
    from fedcl.client.site import load_site_data
    from fedcl.config import FedclError
    from fedcl.privacy.dp import DPConfigError

    try:
        data = load_site_data(exp, site)
    except FedclError:
        return None, None
    privacy = SitePrivacy(SitePlan(exp, site, data))
    try:
        privacy.noise_multiplier  # noqa: B018 - plans σ (and raises what the round would)
    except DPConfigError as err:
        return None, f"{xsrc}: field 'dp': at the data of site {site.site_id}: {err}"
    return privacy, None


def _key_problems(site: SiteConfig, exp: ExperimentConfig, src: str) -> list[str]:
    field = f"{src}: field 'key_path'"
    if site.key_path is None:
        return [f"{field}: the experiment encrypts (he.enabled) but no key_path is set"]
    path = Path(site.key_path)
    if not path.is_file():
        return [
            f"{field}: {path} is not a file: the experiment encrypts (he.enabled); install the "
            "coordinator's bundle with its secret.ctx (`fedcl site bundle`)"
        ]
    from fedcl.privacy.ckks.errors import CKKSKeyError
    from fedcl.privacy.ckks.keys import key_file_info

    try:
        info = key_file_info(path)
    except CKKSKeyError as err:
        return [f"{field}: {err}"]
    if info.kind != "secret":
        return [f"{field}: {path} is a public context; a site needs the secret.ctx"]
    if info.too_open:
        return [f"{field}: {path} is readable by group or others: `chmod 600 {path}`"]
    if exp.he.fingerprint and exp.he.fingerprint.lower() != info.fingerprint:
        return [f"{field}: {path} is another key set than the experiment's he.fingerprint"]
    return []


def _data_problems(site: SiteConfig, src: str) -> list[str]:
    from fedcl.datasets.folder import IMAGE_SUFFIXES, MANIFEST_NAME

    data = site.data
    if data.source != "folder" or data.path is None:
        return []
    root = Path(data.path).expanduser()
    if not root.is_dir() or (root / MANIFEST_NAME).is_file():
        return []  # a CSV manifest, or a missing path (loading names it)
    out = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        images = [
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        ]  # fmt: skip
        if not images:
            out.append(
                f"{src}: field 'data.path': class folder {folder} has no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add this class's images or remove the folder"
            )
    return out


def _deployment_problems(site: SiteDir, notes: list[str]) -> list[str]:
    out = []
    if site.node_key.is_file() and stat.S_IMODE(site.node_key.stat().st_mode) & 0o077:
        out.append(f"{site.node_key} is readable by group or others: `chmod 600 {site.node_key}`")
    if not site.bundle_spec_file.is_file():
        notes.append(f"no coordinator bundle yet: `fedcl site bundle {site.root} BUNDLE_DIR`")
    return out


def data_table(site: SiteConfig, exp: ExperimentConfig) -> Table:
    from fedcl.client.site import load_site_data

    data = load_site_data(exp, site)
    table = Table(title=f"site {site.site_id}: {len(data.train)} train / {len(data.test)} test")
    for col, justify in (("task", "left"), ("name", "left"), ("train", "right"), ("test", "right")):
        table.add_column(col, justify=justify)
    for task in data.stream.tasks:
        table.add_row(
            str(task.index),
            task.name,
            str(len(data.train_set(task.index))),
            str(len(data.test_set(task.index))) if not data.stream.eval_tasks else "–",
        )
    return table


def site_status(site: SiteDir) -> dict:
    from fedcl.privacy.ledger import PrivacyLedger

    from .supernode import connection_state

    config = load_toml(SiteConfig, site.site_toml)
    info: dict = {"site_id": config.site_id, "state_dir": str(site.root)}
    try:
        spec = site.bundle_spec()
        info["federation"], info["superlink"] = spec.federation, spec.superlink
    except ConfigError as err:
        info["bundle"] = str(err)
    info["connection"] = connection_state(site)
    ledger = PrivacyLedger(config.state_dir)
    summary = ledger.summary(config.privacy.delta, budget=config.privacy.epsilon_budget)
    info["privacy"] = {
        "epsilon_spent": summary.epsilon_lifetime,
        "budget": summary.budget,
        "remaining": summary.remaining,
        "delta": summary.delta,
    }
    info["last_rounds"] = [
        {"run": e.run_id, "task": e.task_index, "round": e.server_round,
         "release": e.mechanism, "at": e.timestamp[:19]}
        for e in ledger.entries()[-6:]
    ]  # fmt: skip
    return info


def print_status(info: dict, console: Console) -> None:
    conn = info["connection"]
    if conn["connected"]:
        head = f"[green]connected[/] to {conn['superlink']} (SuperNode pid {conn['supernode_pid']}"
        head += f", port {conn['port']})"
    elif conn["supervisor_pid"]:
        head = f"[yellow]not connected[/] ({conn['state']}): {conn.get('reason') or 'starting'}"
    else:
        head = "[red]down[/]: no supervisor runs (`fedcl site up STATE --detach`)"
    console.print(f"site [bold]{info['site_id']}[/] {head}", soft_wrap=True)
    for line in conn["last_lines"]:
        console.print(f"  | {line}", highlight=False, soft_wrap=True)
    p = info["privacy"]
    eps = "∞" if math.isinf(p["epsilon_spent"]) else f"{p['epsilon_spent']:.3f}"
    budget = f" of {p['budget']:g} (remaining {p['remaining']:.3f})" if p["budget"] else ""
    console.print(f"ε spent {eps}{budget} at δ = {p['delta']:g}")
    if info["last_rounds"]:
        table = Table(title="last privacy releases (training, Fisher, noised evaluations)")
        for col in ("run", "task", "round", "release", "at"):
            table.add_column(col)
        for r in info["last_rounds"]:
            table.add_row(r["run"], str(r["task"]), str(r["round"]), r["release"], r["at"])
        console.print(table)
