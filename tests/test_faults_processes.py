"""Faults across real processes: a site's link cut mid-run, the coordinator killed mid-run.

One federation for the module (enrolment is the slow part), made by the commands a deployment
uses: `fedcl site init` / `coordinator init` / `site bundle`, a real `flower-superlink` (TLS +
SuperNode authentication) started by `fedcl coordinator up`, one supervised SuperNode per site
started by `fedcl site up --detach`. Each site runs on a host of its own: a network namespace
that reaches the coordinator only over its veth link (tests/netns_helpers.py; 10.250.N.0/24
exists only inside this machine). Where namespaces are not permitted the sites run on
127.0.0.1, the link-cut test skips with the reason and the kill/resume test still runs.

* ``test_cut_site_link_mid_run``: a site's link goes down as round 1 starts; round 1 completes
  with the other two as soon as the SuperLink reports the site unavailable (2 missed heartbeats,
  well inside the round timeout) and names the site and why; the link comes back, round 2 waits
  for the site, whose supervised SuperNode reconnected, and it evaluates round 1's model (the
  evaluation travels in the train message) and trains. Seconds to detect, rounds missed and
  seconds to rejoin are printed (``faults:`` lines, -s).
* ``test_coordinator_killed_mid_run_resumes``: DP + HE + EWC; the ServerApp (the process the
  SuperLink's SuperExec starts for a run: the coordinator) and `fedcl coordinator run` are
  SIGKILLed once round 2 (EWC's consolidation) is stored; `fedcl coordinator stop` ends the dead
  run and `fedcl coordinator run --resume` finishes it. The same experiment runs
  uninterrupted alongside, on the same sites through the in-process grid (same apps, same
  registry, same ledgers), as the reference: same schedule and rows, the same releases and ε at
  every site, and the same accuracy matrix to the bit: each site seeds its DP draws from its
  own ``privacy.research_seed`` (set in its site.toml, as only a test or a simulation would).

Every process, namespace and veth the module made is removed, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from netns_helpers import Netns, NetnsUnavailable

from fedcl.server.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.process_faults]

BIN = Path(sys.executable).parent
SITES = ("site-a", "site-b", "site-c")
CUT = "site-c"
# Flower's SuperLink answers for a node that missed 2 heartbeats (30 s apart) with "Node
# Unavailable": that, not our round timeout, is how fast a cut site is noticed. The round
# timeout stays long, so that healthy sites on a busy box are never cut off with it.
HEARTBEAT_PATIENCE_S = 2 * 30

FEDERATION = """\
name = "faults"
experiment = "experiment.toml"
[superlink]
address = "{ip}"
host = "{ip}"
port = {port}
sans = ["{ip}"]
{sites}"""

EXPERIMENT = """\
name = "{name}"
min_sites = 3
seed = 7
[model]
name = "mlp"
[data]
dataset = "digits"
num_tasks = 2
partition = {{ scheme = "iid" }}
[train]
rounds_per_task = 1
local_epochs = 1
lr = {lr}
batch_size = {batch_size}
site_wait_s = {site_wait}
round_timeout_s = {round_timeout}
{quorum}
[continual]
method = "{method}"
{extra}"""

# The experiment's defaults here: DP-SGD needs the larger steps to learn in one epoch; no round
# waits for long or hangs (a healthy round takes seconds; 2 busy cores: tens of seconds).
SETTINGS = dict(method="ewc", lr=0.5, batch_size=16, site_wait=60, round_timeout=180, quorum="")
# Evaluation counts in clear (these sites' policy has no budget, so allows it): the accuracy
# matrix is compared between runs, and noised counts (dp.evaluation's default, σ = 20 on a few
# dozen test examples per site and task) would swamp it; every DP release is then the
# training's or the Fisher's, one per round.
DP_HE = """\
[dp]
epsilon = 8.0
evaluation = "clear"
[he]
enabled = true
public_context = "{public}"
"""


# --- the federation --------------------------------------------------------------------------
@dataclass
class Federation:
    root: Path
    env: dict
    net: Netns | None
    skip_reason: str | None
    procs: list[subprocess.Popen] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def coord(self) -> Path:
        return self.root / "coord" / "coordinator"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.coord / 'registry.db'}"

    @property
    def host(self) -> str:
        return self.net.coordinator_ip if self.net else "127.0.0.1"

    @property
    def superlink(self) -> str:
        spec = json.loads((self.coord / "federation.json").read_text())["superlink"]
        return f"{spec['host']}:{spec['port']}"

    def state(self, site: str) -> Path:
        return self.root / "sites" / site

    def fedcl(self, *args, prefix=(), timeout: float = 120, check: bool = True):
        done = subprocess.run(
            [*prefix, str(BIN / "fedcl"), *map(str, args)], env=self.env, cwd=self.root,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        with open(self.root / "commands.log", "a") as fh:
            fh.write(f"$ fedcl {' '.join(map(str, args))}\n{done.stdout}{done.stderr}\n")
        if check:
            assert done.returncode == 0, f"fedcl {args}:\n{done.stdout}\n{done.stderr}"
        return done

    def flwr(self, *args: str, timeout: float = 60) -> dict:
        done = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"], env=self.env, cwd=self.root,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        start = done.stdout.find("{")
        return json.loads(done.stdout[start:]) if start >= 0 else {}

    def online(self) -> set[str]:
        """The sites the SuperLink counts as online (its view, not the sites'). Each call is a
        `flwr` process (~1 s of CPU): poll it every few seconds."""
        nodes = json.loads((self.coord / "superlink" / "nodes.json").read_text())
        by_node = {str(node): site for site, node in nodes.items()}
        listed = self.flwr("supernode", "ls", "faults").get("nodes") or []
        return {
            by_node[str(n.get("node-id"))]
            for n in listed
            if n.get("status") == "online" and str(n.get("node-id")) in by_node
        }

    def experiment(self, name: str, *, dp_he: bool = False, **settings) -> Path:
        extra = DP_HE.format(public=self.coord / "public.ctx") if dp_he else ""
        values = {**SETTINGS, "extra": extra, **settings}
        path = self.root / "coord" / f"{name}.toml"
        path.write_text(EXPERIMENT.format(name=name, **values))
        return path

    def start_run(self, experiment: Path, run_id: str, *extra: str) -> subprocess.Popen:
        with open(self.root / f"run-{run_id}.log", "ab") as out:
            proc = subprocess.Popen(
                [str(BIN / "fedcl"), "coordinator", "run", str(experiment), "-d", str(self.coord),
                 "--run-id", run_id, *extra],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def run_log(self, run_id: str) -> str:
        return read(self.root / f"run-{run_id}.log")[-4000:]

    def rounds(self, run_id: str) -> list:
        with Registry.open(self.url) as reg:
            return reg.list_rounds(run_id) if reg.get_run(run_id) else []

    def participations(self, run_id: str) -> list:
        with Registry.open(self.url) as reg:
            return reg.list_participations(run_id) if reg.get_run(run_id) else []


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_for(predicate, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def processes(*needles: str) -> set[int]:
    """Live processes whose argv holds every needle (zombies left out)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if state != "Z" and all(any(n in a for a in argv) for n in needles):
            found.add(int(entry.name))
    return found


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(root / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    env.pop("FEDCL_REGISTRY_URL", None)
    try:
        net, skip = Netns.create(list(SITES)), None
    except NetnsUnavailable as exc:
        net, skip = None, f"network namespaces unavailable: {exc}"
    fed = Federation(root=root, env=env, net=net, skip_reason=skip)
    try:
        start = time.monotonic()
        _enrol(fed)
        fed.timings["enrol + SuperLink + 3 sites connected"] = time.monotonic() - start
        yield fed
    finally:
        _teardown(fed)
        print(f"\nfaults: timings (s) { {k: round(v, 1) for k, v in fed.timings.items()} }")


def _enrol(fed: Federation) -> None:
    coord = fed.root / "coord"
    (coord / "keys").mkdir(parents=True)
    for k, sid in enumerate(SITES):  # each site: its state folder and key pair, node.pub out
        data = f"builtin:{k}/3"  # budget 0: no limit (the module's runs add up past 8)
        fed.fedcl("site", "init", fed.state(sid), "--site-id", sid, "--data", data,
                  "--epsilon-budget", "0")  # fmt: skip
        _seed_noise(fed.state(sid) / "site.toml", 1000 + k)
        (coord / "keys" / f"{sid}.pub").write_bytes((fed.state(sid) / "node.pub").read_bytes())
    sites = "".join(f'[[sites]]\nid = "{s}"\npublic_key = "keys/{s}.pub"\n' for s in SITES)
    port = free_port(fed.host)
    (coord / "federation.toml").write_text(FEDERATION.format(ip=fed.host, port=port, sites=sites))
    extra = "[dp]\nepsilon = 8.0\n[he]\nenabled = true\n"  # coordinator init makes the keys
    (coord / "experiment.toml").write_text(
        EXPERIMENT.format(name="faults", **SETTINGS, extra=extra)
    )
    fed.fedcl("coordinator", "init", coord / "federation.toml", "--out", fed.coord)
    _check_certificate(fed)
    fed.fedcl("coordinator", "up", "-d", fed.coord)
    for sid in SITES:  # each site installs its bundle and starts on its own host
        fed.fedcl("site", "bundle", fed.state(sid), fed.coord / "bundles" / sid)
        prefix = fed.net.exec_prefix(sid) if fed.net else ()
        fed.fedcl("site", "up", fed.state(sid), "--detach", prefix=prefix)
    wait_for(lambda: fed.online() == set(SITES), 120, "all three sites online", every=3)


def _seed_noise(site_toml: Path, seed: int) -> None:
    """The site's research seed for its DP draws (``privacy.research_seed``, config/site.py), set
    by the site as an administrator would: a run then draws the same DP noise as another run of
    the same experiment, so the resumed run is compared with the uninterrupted one to the bit."""
    import tomllib

    import tomli_w

    data = tomllib.loads(site_toml.read_text())
    data.setdefault("privacy", {})["research_seed"] = seed
    site_toml.write_text(tomli_w.dumps(data))


def _check_certificate(fed: Federation) -> None:
    """The server certificate is issued for the address the sites dial."""
    import ipaddress

    from cryptography import x509

    cert = x509.load_pem_x509_certificate((fed.coord / "tls" / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address(fed.host) in sans.get_values_for_type(x509.IPAddress)


def _teardown(fed: Federation) -> None:
    for proc in fed.procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for sid in SITES:
        if fed.state(sid).is_dir():
            with contextlib.suppress(Exception):
                fed.fedcl("site", "down", fed.state(sid), timeout=40, check=False)
    if (fed.coord / "federation.json").is_file():
        with contextlib.suppress(Exception):
            fed.fedcl("coordinator", "down", "-d", fed.coord, timeout=40, check=False)
    for pid_file in fed.root.rglob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
    for pid in processes(str(fed.root)) - {os.getpid()}:  # still holding a path of ours: ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if fed.net is not None:
        fed.net.close()
        assert fed.net.leftovers() == [], "namespaces or links left behind"


class ReferenceRun(threading.Thread):
    """The same experiment, uninterrupted, on the same sites (their site.toml, data, keys and
    ledgers), run in this process through the in-process grid while the deployed run goes on.

    It is the reference the resumed run is compared with: same ServerApp and ClientApp code,
    same experiment as ``fedcl coordinator run`` checks it, same registry; only the transport
    differs, so no second set of ClientApp processes (one per message) competes for the CPU.
    """

    def __init__(self, fed: Federation, experiment: Path, run_id: str):
        super().__init__(daemon=True)
        from fedcl.cli.federation import CoordinatorDir
        from fedcl.cli.run_cmd import resolve

        exp, _ = resolve(CoordinatorDir(fed.coord), experiment, run_id, None)
        sim = exp.simulation.model_copy(update={"num_sites": len(SITES)})
        self.experiment = exp.model_copy(update={"simulation": sim})
        self.fed, self.run_id = fed, run_id
        self.status: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from federation_helpers import run_inprocess

        configs = [{"site-config": str(self.fed.state(s) / "site.toml")} for s in SITES]
        try:
            self.status, _, _ = run_inprocess(
                self.experiment, self.fed.root / f"ref-{self.run_id}", registry_url=self.fed.url,
                run_id=self.run_id, node_configs=configs,
            )  # fmt: skip
        except BaseException as exc:  # reported by the test, not lost in this thread
            self.error = exc


# --- 1. a site's link cut mid-run --------------------------------------------------------------
def test_cut_site_link_mid_run(federation: Federation) -> None:
    fed = federation
    if fed.net is None:
        pytest.skip(fed.skip_reason)
    wait_for(lambda: fed.online() == set(SITES), 120, "all three sites online", every=3)
    # Two training rounds (one per task). Round 1 goes on without the cut site once the
    # SuperLink says it is unavailable, and the link comes back; the site's SuperNode, still
    # retrying (cli/supernode.py MAX_WAIT_S), reconnects, round 2 waits for it (site_wait_s)
    # and it trains.
    exp = fed.experiment(
        "cut", method="naive", lr=0.1, batch_size=32, site_wait=180, round_timeout=300,
        quorum="quorum = 2",
    )  # fmt: skip
    start = time.monotonic()
    proc = fed.start_run(exp, "cut")
    t: dict[str, float] = {}

    def cut_site_rows(server_round: int) -> list:
        return [p for p in fed.participations("cut")
                if p.server_round == server_round and p.site_id == CUT]  # fmt: skip

    try:
        wait_for(lambda: len(fed.rounds("cut")) >= 1, 240, "round 1 to begin", every=0.1)
        fed.net.cut(CUT)  # as round 1 sends its training messages
        t["cut"] = time.monotonic()
        (failure,) = wait_for(lambda: cut_site_rows(1), 240, f"{CUT} to fail round 1", every=0.5)
        t["detected"] = time.monotonic()
    finally:
        fed.net.restore(CUT)  # the link comes back as soon as the round has given up on it
    t["restored"] = time.monotonic()
    code = proc.wait(timeout=480)
    t["run ended"] = time.monotonic()
    assert code == 0, fed.run_log("cut")

    rounds, parts = fed.rounds("cut"), fed.participations("cut")
    assert [(r.server_round, r.status) for r in rounds] == [(1, "completed"), (2, "completed")]

    def took_part(server_round: int, phase: str) -> set[str]:
        here = [p for p in parts if p.server_round == server_round and p.phase == phase]
        return {p.site_id for p in here if p.status == "ok"}

    # Round 1 went on with the other two, within its timeout, and names the site and why.
    # Its model was scored by round 2's train messages (one round trip per round), at every
    # site: the cut site, back, evaluated the model it had missed before training on it.
    assert took_part(1, "train") == {"site-a", "site-b"}
    assert took_part(1, "evaluate") == set(SITES)
    asked = {(p.phase, p.status) for p in cut_site_rows(1)}
    assert asked == {("train", "failed"), ("evaluate", "ok")}, asked
    assert (failure.phase, failure.status) == ("train", "failed")
    assert "Node Unavailable" in (failure.detail or ""), failure.detail
    train_phase_s = (failure.created_at - rounds[0].started_at).total_seconds()
    # Not the 300 s round timeout: the heartbeats, plus slack for a busy box (100 s seen at a
    # load average of 20).
    assert train_phase_s <= HEARTBEAT_PATIENCE_S + 60, train_phase_s
    # Round 2: the site is back and trained from the current global model like the others
    # (every model-hash agreement metric is 1.0).
    assert took_part(2, "train") == took_part(2, "evaluate") == set(SITES), fed.run_log("cut")
    assert [p for p in cut_site_rows(2) if p.status != "ok"] == []
    with Registry.open(fed.url) as reg:
        agreement = {m.name: m.value for m in reg.list_metrics("cut")
                     if m.name.endswith("-agreement") and m.server_round == 2}  # fmt: skip
    assert agreement.get("model-sha256-agreement") == 1.0 and set(agreement.values()) == {1.0}
    rejoined = next(p.created_at for p in cut_site_rows(2) if p.phase == "train")
    # Only our sites are named: an error the SuperLink makes up for a lost node ("Node
    # Unavailable", sent from node 1) is that node's (strategies/outcomes.py answered_for).
    assert {p.site_id for p in parts} == set(SITES), sorted({p.site_id for p in parts})

    log = read(fed.state(CUT) / "supernode" / "supervisor.log")
    fed.timings["cut test"] = t["run ended"] - start
    print(
        f"\nfaults: link cut as round 1 began; the coordinator recorded {CUT} failed "
        f"({failure.detail!r}) {t['detected'] - t['cut']:.1f} s later (train phase "
        f"{train_phase_s:.1f} s; round timeout 300 s); link down "
        f"{t['restored'] - t['cut']:.1f} s; {CUT}'s round-2 update arrived "
        f"{(rejoined - rounds[1].started_at).total_seconds():.1f} s after round 2 began (it "
        f"missed round 1 only); federation rounds lost: 0 of {len(rounds)}; round seconds "
        f"{[round(r.seconds, 1) for r in rounds]}; {CUT}'s supervisor:\n{log}"
    )


# --- 2. the coordinator killed mid-run, resumed ------------------------------------------------
def test_coordinator_killed_mid_run_resumes(federation: Federation) -> None:
    fed = federation
    wait_for(lambda: fed.online() == set(SITES), 240, "all three sites online", every=3)
    exp = fed.experiment("dphe", dp_he=True)
    start = time.monotonic()
    serverapp = ("flwr-serverapp", fed.superlink)  # a ServerApp dialling our SuperLink
    before = processes(*serverapp)
    interrupted = fed.start_run(exp, "resume-me")
    pids = wait_for(lambda: processes(*serverapp) - before, 180, "the ServerApp of resume-me")
    assert len(pids) == 1, pids
    (victim,) = pids
    reference = ReferenceRun(fed, exp, "straight")  # the uninterrupted run, alongside
    reference.start()

    def completed(run_id: str) -> list[int]:
        return [r.server_round for r in fed.rounds(run_id) if r.status == "completed"]

    # Killed once EWC's consolidation (round 2) is stored: the resumed coordinator must take
    # the model, the Fisher and its anchor from the registry, and round 3 is the one in flight.
    wait_for(lambda: 2 in completed("resume-me"), 600, "round 2 of resume-me", every=0.1)
    os.kill(victim, signal.SIGKILL)  # the coordinator dies: no chance to record anything
    os.killpg(interrupted.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with Registry.open(fed.url) as reg:
        status_at_kill = reg.get_run("resume-me").status
        before_kill = {r.server_round: r for r in reg.list_rounds("resume-me")}
        versions_at_kill = {v.id: v for v in reg.list_model_versions("resume-me")}
    done_at_kill = max(r for r, info in before_kill.items() if info.status == "completed")
    assert status_at_kill == "running" and done_at_kill == 2, before_kill

    # What the README says to do after a crash: stop the dead run (Flower would list it as
    # running for another ~60 s and `--resume` refuses a running run), then resume it.
    flower_id = json.loads((fed.coord / "runs" / "resume-me" / "flower.json").read_text())
    stop_began = time.monotonic()
    fed.fedcl("coordinator", "stop", "resume-me", "-d", fed.coord, "--reason", "it crashed")
    fed.timings["coordinator stop of a dead run"] = time.monotonic() - stop_began
    for pid in processes("flwr", "log", str(flower_id["flower_run_id"])):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the killed follower's `flwr log --stream`
    resumed_at = datetime.now(UTC)
    resumed = fed.start_run(exp, "resume-me", "--resume", "resume-me")
    assert resumed.wait(timeout=600) == 0, fed.run_log("resume-me")
    ended = time.monotonic()
    reference.join(timeout=600)
    assert reference.status == "completed", reference.error
    fed.timings["kill/resume test"] = time.monotonic() - start

    with Registry.open(fed.url) as reg:
        runs = {rid: reg.get_run(rid) for rid in ("resume-me", "straight")}
        rounds = {rid: reg.list_rounds(rid) for rid in runs}
        parts = {rid: reg.list_participations(rid) for rid in runs}
        audit = [a.message for a in reg.list_audit(run_id="resume-me")]
        versions = {v.id: v for v in reg.list_model_versions("resume-me")}
        from fedcl.server.results import build_results

        results = {rid: build_results(reg, rid) for rid in runs}
    assert {rid: r.status for rid, r in runs.items()} == {"resume-me": "completed",
                                                          "straight": "completed"}  # fmt: skip
    # Same schedule, every round once and completed, contiguous from 1.
    schedule = {rid: [(r.server_round, r.kind, r.task_index, r.status) for r in rs]
                for rid, rs in rounds.items()}  # fmt: skip
    assert schedule["resume-me"] == schedule["straight"] == [
        (1, "train", 0, "completed"), (2, "consolidate", 0, "completed"),
        (3, "train", 1, "completed"),
    ]  # fmt: skip
    # No round repeated: the rounds completed before the kill are the ones the first
    # ServerApp ran (same rows, same times); the later ones ran after the resume.
    for r in rounds["resume-me"]:
        if r.server_round <= done_at_kill:
            old = before_kill[r.server_round]
            assert (r.id, r.started_at, r.finished_at) == (old.id, old.started_at, old.finished_at)
        else:
            assert r.started_at >= resumed_at, (r.server_round, r.started_at, resumed_at)
    reset = [m for m in audit if "was left running" in m]
    assert len(reset) == (done_at_kill + 1 in before_kill), audit  # the round it died in

    # The models (and EWC's Fisher) stored before the kill are what the resumed run went on
    # from: kept as they were; what the dead round had stored was discarded and made again.
    # (Kept as stored: the same artifact, hash and row; only its lifecycle status may move on,
    # e.g. the first evaluated model becoming production, server/versions.py.)
    def artifact(v) -> tuple | None:
        return v and (v.id, v.path, v.sha256, v.size_bytes, v.kind, v.server_round, v.created_at)

    kept = {i: artifact(v) for i, v in versions_at_kill.items() if v.server_round <= done_at_kill}
    assert kept and {i: artifact(versions.get(i)) for i in kept} == kept
    later = [v for v in versions.values() if v.server_round > done_at_kill]
    assert later and all(v.created_at >= resumed_at for v in later), later
    # Every site took part in every round of both runs.
    for rid in runs:
        assert all(r.num_participants == 3 and r.num_failures == 0 for r in rounds[rid]), rid
        assert {p.site_id for p in parts[rid] if p.status == "ok"} == set(SITES)
    # Privacy: every site made the same releases, round by round, as in the uninterrupted run,
    # each exactly once (a round asked again is answered from the site's kept reply, or reuses
    # the charge of a reply that never left), and reports the same ε.
    epsilon = {sid: _compare_ledgers(fed.state(sid), results, sid) for sid in SITES}
    # The accuracy matrix, the federation's and each site's: every site draws its DP noise from
    # its own research seed (_seed_noise), CKKS rounds from the experiment seed, and the sums
    # are taken in site order, so the resumed run must equal the uninterrupted one to the bit.
    # (With the OS's noise, two runs of this experiment spread by up to 0.39 on one entry.)
    got, want = (results[rid]["accuracy_matrix"] for rid in ("resume-me", "straight"))
    assert len(got) == len(want) == 2 and all(len(row) == 2 for row in got)
    assert got == want, (got, want)
    for sid in SITES:
        per_site = [results[rid]["sites"][sid]["accuracy_matrix"] for rid in results]
        assert per_site[0] == per_site[1], (sid, per_site)
    print(
        f"\nfaults: ServerApp killed after round {done_at_kill} ({killed_at - start:.1f} s in); "
        f"resumed run took {ended - killed_at:.1f} s more, rounds "
        f"{[r.server_round for r in rounds['resume-me']]} each once; accuracy matrix resumed "
        f"{_fmt(got)} (the uninterrupted run's, to the bit); ε per site "
        f"(resumed, uninterrupted): {epsilon}"
    )


def _compare_ledgers(state: Path, results: dict, site: str) -> tuple[float, float]:
    from fedcl.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(state)

    def by_round(rid: str) -> dict[int, list[tuple]]:
        out: dict[int, list[tuple]] = {}
        for e in ledger.entries(run_id=rid):
            out.setdefault(e.server_round, []).append((e.mechanism, e.release.history))
        return out

    resumed, straight = by_round("resume-me"), by_round("straight")
    assert resumed == straight, (site, resumed, straight)  # rounds 1-3, one release each
    assert sorted(resumed) == [1, 2, 3] and all(len(r) == 1 for r in resumed.values())
    reported = {rid: results[rid]["sites"][site]["epsilon"] for rid in results}
    delta = ledger.entries(run_id="straight")[0].delta
    assert reported["resume-me"] == pytest.approx(reported["straight"], rel=1e-9)
    assert reported["straight"] == pytest.approx(ledger.epsilon(delta, run_id="straight"))
    return round(reported["resume-me"], 4), round(reported["straight"], 4)


def _fmt(matrix: list[list[float]]) -> list[list[float]]:
    return [[round(v, 3) for v in row] for row in matrix]
