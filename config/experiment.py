"""The experiment: everything a coordinator needs to run a federation (docs/DESIGN.md §8).

One pydantic model per TOML table, ``extra="forbid"`` everywhere, so a misspelt key is an error
that names it rather than a silently ignored setting. Sites receive the validated experiment with
every message, so both sides always agree on the model, the stream and the hyper-parameters.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which network to build (see ``fedcl.models.available_models()``)."""

    name: str = "cnn"
    options: dict[str, Any] = Field(default_factory=dict)


class PartitionSpec(_Strict):
    """How a built-in dataset is split across virtual sites."""

    scheme: Literal["iid", "dirichlet", "domain"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    seed: int = 0
    #: Fewest examples a site may get (many small sites: lower it, e.g. digits-many-sites).
    min_per_site: int = Field(10, ge=1)


class DataSpec(_Strict):
    """The data and the continual stream cut from it (docs/DESIGN.md §7)."""

    dataset: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    # Only for dataset = "folder": the coordinator never sees site data, so the label space and
    # the image shape are declared here and every site's folder is checked against them.
    class_names: list[str] | None = None
    domain_names: list[str] | None = None
    image_size: int | None = Field(None, ge=4)
    channels: Literal[1, 3] | None = None
    scenario: Literal["class-il", "domain-il", "task-il"] = "domain-il"
    num_tasks: int = Field(5, ge=1)
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    test_fraction: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _folder_needs_metadata(self) -> DataSpec:
        if self.dataset == "folder" and not (
            self.class_names and self.image_size and self.channels
        ):
            raise ValueError(
                "dataset = 'folder' needs class_names, image_size and channels: the coordinator "
                "builds the model without seeing any site's data"
            )
        return self


class StrategySpec(_Strict):
    """How updates are aggregated and which replies are accepted.

    ``name`` is looked up in ``fedcl.strategies.STRATEGIES`` (fedavg, fedprox) when the run is
    planned, so adding a strategy needs no change here.
    """

    name: str = Field("fedavg", pattern=r"^[a-z0-9_-]+$")
    proximal_mu: float = Field(0.01, ge=0)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, gt=0, le=1)
    #: A plaintext reply whose update ||w_site - w_global||_2 exceeds this is dropped and
    #: audited (a diverged or corrupted site); None accepts any finite update.
    max_update_norm: float | None = Field(None, gt=0)


#: The training settings DP-SGD takes its own values for (``[train.dp]``, :func:`dp_recipe`).
DP_RECIPE_FIELDS = ("optimizer", "batch_size", "lr", "momentum", "ema", "augment")


class AugmentSpec(_Strict):
    """``[train.augment]``: random image augmentation of each training batch, at the site.

    ``multiplicity`` K > 1 trains on K augmented copies of every example drawn. Without DP that
    is a K-times larger batch of correlated copies; under DP-SGD each example's gradient is
    the *mean over its K copies* before it is clipped, so the example's influence is still
    bounded by the clip norm and the sample rate, steps and ε are exactly those of K = 1
    (De et al. 2022, "augmentation multiplicity": the mean of K augmented gradients has less
    variance than one, while the noise stays the same). A transform of one example at a time
    touches no other example, so augmentation itself costs no privacy.
    """

    #: Largest random translation in pixels, each axis (zero padding: the digits' background).
    shift: int = Field(0, ge=0)
    #: Random horizontal flips (textures, surfaces; not digits, whose mirror image is no digit).
    flip: bool = False
    multiplicity: int = Field(1, ge=1, le=64)

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.flip

    @model_validator(mode="after")
    def _copies_need_a_transform(self) -> AugmentSpec:
        if self.multiplicity > 1 and not self.active:
            raise ValueError(
                f"train.augment.multiplicity = {self.multiplicity} needs a random transform "
                "(train.augment.shift > 0 or train.augment.flip = true): without one the "
                "copies are identical and only cost time"
            )
        return self


class TrainDPSpec(_Strict):
    """``[train.dp]``: what local training uses instead of ``[train]``'s values when DP is on.

    Why a second set: DP-SGD wants other hyper-parameters than plain SGD. The noise on the
    averaged gradient is σ·C / (expected batch), and a larger sample rate costs less σ per
    step than it gains, so DP-SGD wants large expected batches and a step size to match
    (De et al. 2022; measured on digits in docs/notes/measurements.md: batch 16 / lr 0.1 gives
    class-IL replay 0.389, batch 128 / lr 1.0 gives 0.662). A scenario's ``[train]`` is tuned
    without DP; its ``[train.dp]`` says what to use under DP. A field left unset here takes
    ``[train]``'s value if the experiment sets that (``base = "train"``), else the built-in
    recipe (:func:`dp_recipe`). Without DP this table is not read.
    """

    #: What a field unset here falls back to: ``[train]``'s value where the experiment sets
    #: it (``"train"``), or the DP recipe in any case (``"recipe"``: what a built-in scenario
    #: says, its ``[train]`` being tuned without DP).
    base: Literal["train", "recipe"] = "train"
    #: Adam's per-coordinate step scales DP noise up: a scenario whose non-private training
    #: needs Adam (plain SGD without clipping diverges there) trains with SGD under DP.
    optimizer: Literal["sgd", "adam"] | None = None
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    ema: float | None = Field(None, ge=0, lt=1)
    augment: AugmentSpec | None = None


class TrainSpec(_Strict):
    """Local training at each site and the round schedule.

    Under DP, ``optimizer``, ``batch_size``, ``lr``, ``momentum``, ``ema`` and ``augment`` are
    resolved from ``[train.dp]`` and the DP recipe when the experiment is validated
    (:func:`resolve_dp_training`), so every reader of ``train`` (the trainer, the site's noise
    planner) sees the values DP-SGD uses.
    """

    rounds_per_task: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1)
    #: The largest expected batch; under DP the Poisson sample rate is fitted to it per task.
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    #: Decay of an exponential moving average of the weights over a round's local steps (0:
    #: off). The site sends the average instead of the last iterate: under DP it is
    #: post-processing of the noised iterates, so it costs no ε (De et al. 2022).
    ema: float = Field(0.0, ge=0, lt=1)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    #: What DP-SGD uses instead of the values above (see :class:`TrainDPSpec`).
    dp: TrainDPSpec = Field(default_factory=TrainDPSpec)
    round_timeout_s: float = Field(600.0, gt=0)
    #: How long a round waits for the expected sites to be connected; after it the round goes
    #: on with the sites present if there are at least ``quorum`` of them, or the run stops.
    site_wait_s: float = Field(120.0, gt=0)
    #: Fewest connected sites a round proceeds with after ``site_wait_s`` (default: all).
    quorum: int | None = Field(None, ge=1)


class EvaluationSpec(_Strict):
    """When the sites evaluate the global model (docs/DESIGN.md §3).

    ``with_train`` (the default): a round's train message carries the model the previous round
    produced, so each sampled site evaluates it *before* training on it and sends both in one
    reply: one Flower round trip per round. The first round evaluates the untrained model (the
    baseline), and the last model is evaluated by one evaluate message at the end; a model is
    scored at the sites sampled for the next round (``strategy.fraction_evaluate`` is not used).
    ``separate``: an evaluate message after every round, to ``fraction_evaluate`` of the sites
    (twice the round trips). The canary (``canary_max_drop``) needs a round's accuracy before
    the next round starts, so it always evaluates separately.
    """

    mode: Literal["with_train", "separate"] = "with_train"


class DPSpec(_Strict):
    """DP-SGD at the sites (Opacus); each site also enforces its own budget (site.toml).

    Setting ``epsilon`` or ``noise_multiplier`` turns DP on unless ``enabled`` says otherwise,
    so ``--set dp.epsilon=8`` does what it reads like.
    """

    enabled: bool = False
    noise_multiplier: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    #: Smallest expected Poisson batch a task's sampling plan may have; a task whose N gives
    #: less (at q = 1/2) is refused at that site (``fedcl.privacy.dp.sampling_plan``). The
    #: default, one example at q = 1/2, lets every task with an example train; a site that
    #: would rather not spend ε on a task that small raises it (e.g. 8).
    min_expected_batch: float = Field(0.5, ge=0.5)
    #: What evaluation tells the coordinator under DP: per-task counts with Gaussian noise,
    #: charged to the site's ledger before they leave (``noised``), nothing (``withheld``), or
    #: exact counts and losses, unaccounted (``clear``; a site that requires DP refuses it).
    evaluation: Literal["noised", "withheld", "clear"] = "noised"
    #: σ of the noised evaluation counts, relative to their L2 sensitivity √2. Unset, the run's
    #: plan chooses it (``fedcl.continual.plan.RunPlan.evaluation_noise_multiplier``, which
    #: the coordinator writes into the experiment it sends): where the test data is a data cell
    #: of its own (parallel composition with a cell-disjoint method) the evaluations may spend
    #: 0.9·ε alone (σ ≈ 1.7 at ε = 8); otherwise they compose with DP-SGD and get 24 / ε within
    #: [3, 20] (3 at ε = 8; 20 with a fixed ``dp.noise_multiplier``). Left unset here because
    #: which applies is the method table's fact, and config imports no other package.
    evaluation_noise_multiplier: float | None = Field(None, gt=0)
    #: How a site composes its releases (docs/DESIGN.md §9). ``parallel``: each release is
    #: charged to the data cells it reads (a task's training data, the test data) and ε is the
    #: max over cells, so each task gets nearly the whole ε, *where the method is proven
    #: cell-disjoint* (naive, EWC, LwF, SI; replay and joint fall back to sequential and the site
    #: says so); a site's ``privacy.allow_parallel_composition = false`` forbids it.
    #: ``sequential``: every release composes with every other (the whole run at one ε).
    composition: Literal["parallel", "sequential"] = "parallel"

    @model_validator(mode="before")
    @classmethod
    def _on_when_configured(cls, data: Any) -> Any:
        configured = isinstance(data, dict) and (
            data.get("epsilon") is not None or data.get("noise_multiplier") is not None
        )
        if configured and "enabled" not in data:
            data = {**data, "enabled": True}
        return data

    @property
    def evaluation_mode(self) -> str:
        """What evaluation sends: ``clear`` without DP, else :attr:`evaluation`."""
        return self.evaluation if self.enabled else "clear"

    @model_validator(mode="after")
    def _needs_noise(self) -> DPSpec:
        if self.enabled and self.noise_multiplier is None and self.epsilon is None:
            raise ValueError(
                "dp.enabled = true needs dp.epsilon (a target, e.g. 8) or dp.noise_multiplier"
            )
        return self


class HESpec(_Strict):
    """CKKS-encrypted aggregation (``fedcl.privacy.ckks``): the coordinator only adds ciphertexts.

    Sites encrypt their example-weighted *weights* (not deltas), so every aggregate is a whole
    model: a site that was offline or restarted decrypts the latest one and is current again.

    Only syntax and ranges are checked here. Whether the packing can sum ``max_sites``
    ciphertexts exactly is CKKS arithmetic: ``fedcl.privacy.ckks.check_packing`` decides it, and
    ``packing_for`` turns these settings into the codec's ``Packing``.
    """

    enabled: bool = False
    #: Coordinator only: the public context written by ``fedcl keys init`` (never secret.ctx).
    public_context: str | None = None
    #: SHA-256 of the key set (``fedcl keys show``); pins the keys at both ends.
    fingerprint: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    #: Quantisation bits per value; the step is clip / (2^(bits-1) - 1).
    bits: int = Field(15, ge=2, le=32)
    #: Values packed per CKKS slot: 2 gives 16 bytes per parameter (4x fp32), up to 32 sites
    #: a round at 15 bits; 1 gives 32 (8x) for any round size. None: the most that can sum
    #: ``max_sites`` sites exactly at ``bits`` (``fedcl.privacy.ckks.packing_for``).
    values_per_slot: Literal[1, 2, 3] | None = None
    #: Most sites summed in one round; sets the headroom bits, ceil(log2(max_sites)). None:
    #: the round's size, ceil(expected sites x strategy.fraction_train), filled in when the
    #: experiment is validated (a deployment's run fills in its enrolled sites instead).
    max_sites: int | None = Field(None, ge=1)
    #: Weights are clipped to [-clip, clip] before quantisation (stochastic rounding).
    clip: float = Field(4.0, gt=0)
    #: Fisher diagonals (EWC) are clipped to [0, fisher_clip] before quantisation.
    fisher_clip: float = Field(4.0, gt=0)
    #: Weight unit: a site's weight is min(n, max_examples) / max_examples.
    max_examples: int = Field(10_000, ge=1)
    #: Culprit search after a corrupt aggregate: fewest sites in any group sum it checks.
    min_group_size: int = Field(2, ge=2)


class ContinualSpec(_Strict):
    """How sites keep earlier tasks (docs/DESIGN.md §7): a method of ``fedcl.continual.methods``.

    ``method`` is a plain name here; the method table checks it where the method is looked up
    (``fedcl.continual.methods.get_method``), since ``config`` imports nothing else of fedcl.
    ``options`` holds a method's own settings (e.g. LwF's ``temperature``), validated by that
    method; the EWC and replay settings keep their top-level fields below.
    """

    method: str = "naive"
    options: dict[str, Any] = Field(default_factory=dict)
    ewc_lambda: float = Field(100.0, ge=0)
    ewc_gamma: float = Field(1.0, gt=0, le=1)
    fisher_clip_norm: float = Field(0.3, gt=0)
    fisher_noise_multiplier: float = Field(3.0, gt=0)
    fisher_batch_size: int = Field(64, ge=1)
    replay_size: int = Field(100, ge=1)
    replay_policy: Literal["reservoir", "class-balanced"] = "class-balanced"


class DriftTriggerSpec(_Strict):
    """When drift opens the next task (``drift.action = "new-task"``): a continual update.

    Tasks after the first wait for a trigger in up to ``watch_rounds`` monitoring rounds after
    the previous task's training: ``min_sites`` sites alerting in one round, or one site whose
    predicted rate of some class moved by more than ``rate_change`` (the seeds' 5 %: 0.05).
    A task nothing triggers is never opened, and the run ends there.
    """

    min_sites: int | None = Field(None, ge=1)
    rate_change: float | None = Field(None, gt=0, lt=1)
    watch_rounds: int = Field(3, ge=1)


class DriftSpec(_Strict):
    """The drift monitor at every site (``fedcl.continual.drift``; docs/DESIGN.md §12).

    Any key in ``[drift]`` turns it on unless ``enabled`` says otherwise. After every training
    round (and in monitoring rounds) each site compares a window of ``window`` examples of its
    data with a reference of ``reference`` examples of the current task's data, on a ``dim``-
    dimensional projection of the global model's embeddings and on its predicted classes, and
    sends only a score and an alert bit (noised and charged to its ledger under DP, at
    ``noise_multiplier``; features clipped to ``clip_norm``). The threshold is the ``quantile``
    of the site's own no-drift bootstrap (``calibration = "bootstrap"``, ``bootstrap``
    resamples), a fixed ``threshold`` (``"fixed"``: the seeds' KL > 0.15 is ``detector = "kl"``,
    ``threshold = 0.15``) or the detector's own test at level 1 − quantile (``"test"``).
    """

    enabled: bool = False
    detector: Literal["ks", "mmd", "kl", "psi"] = "ks"
    calibration: Literal["bootstrap", "fixed", "test"] = "bootstrap"
    threshold: float | None = Field(None, gt=0)
    quantile: float = Field(0.99, gt=0.5, lt=1)
    window: int = Field(200, ge=10)
    reference: int = Field(600, ge=20)
    bootstrap: int = Field(500, ge=50, le=20_000)
    projection: Literal["random", "pca"] = "random"
    dim: int = Field(8, ge=1, le=256)
    bins: int = Field(10, ge=2, le=100)
    clip_norm: float = Field(4.0, gt=0)
    noise_multiplier: float = Field(2.0, gt=0)
    action: Literal["alert", "new-task"] = "alert"
    trigger: DriftTriggerSpec = Field(default_factory=DriftTriggerSpec)

    @model_validator(mode="before")
    @classmethod
    def _on_when_configured(cls, data: Any) -> Any:
        if isinstance(data, dict) and data and "enabled" not in data:
            data = {**data, "enabled": True}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DriftSpec:
        if self.calibration == "fixed" and self.threshold is None:
            raise ValueError("drift.calibration = 'fixed' needs drift.threshold (e.g. 0.15)")
        if self.threshold is not None and self.calibration != "fixed":
            raise ValueError("drift.threshold is only read with drift.calibration = 'fixed'")
        if self.reference < 2 * self.window:  # the monitor's window is at most half its reference
            raise ValueError(
                f"drift.reference ({self.reference}) must be at least twice drift.window "
                f"({self.window}); 3x is a good start"
            )
        trigger = self.trigger
        if self.action == "new-task" and trigger.min_sites is None and trigger.rate_change is None:
            raise ValueError(
                "drift.action = 'new-task' needs drift.trigger.min_sites or "
                "drift.trigger.rate_change"
            )
        return self


class DriftEventSpec(_Strict):
    """Simulations only: from server round ``round`` on, virtual site ``site`` sees task ``task``.

    The site's incoming data (its drift windows) comes from that task's data before the
    federation trains it: its lighting or material changed (``[[simulation.drift]]``).
    """

    site: int = Field(ge=0)
    round: int = Field(ge=1)
    task: int = Field(1, ge=1)


class FaultSpec(_Strict):
    """One misbehaviour of one virtual site, on demand (``[[simulation.faults]]``).

    Rehearses what a real site or network does, through the real apps: ``nan`` (its update
    holds NaNs), ``bitflip`` (one bit flipped in the middle of its update's bytes), ``duplicate``
    (its reply arrives twice), ``stale`` (it re-sends its reply of the round before),
    ``disconnect`` (it is gone from ``round`` for ``rounds`` rounds, then comes back) and
    ``crash`` (its ClientApp raises).
    """

    site: int = Field(ge=0)  # the virtual site's index (site-<index>)
    round: int = Field(ge=1)  # the server round
    kind: Literal["nan", "bitflip", "duplicate", "stale", "disconnect", "crash"]
    rounds: int = Field(1, ge=1)


class SimulationSpec(_Strict):
    """Virtual sites on one box (Flower's Ray simulation engine)."""

    num_sites: int = Field(5, ge=1)
    #: Privacy budget each virtual site enforces (a real site sets its own in site.toml).
    site_epsilon_budget: float | None = Field(None, gt=0)
    num_cpus: float = Field(1.0, gt=0)
    #: GPUs per virtual site (fractional: 0.25 puts four sites on a GPU). With num_gpus > 0 and
    #: CUDA present, each site trains on the GPU Ray assigns it; without CUDA the run says so
    #: and trains on the CPU.
    num_gpus: float = Field(0.0, ge=0)
    #: Each virtual site's ``max_physical_batch`` (its site.toml): the most examples one DP-SGD
    #: pass holds, for models whose per-example gradients would not fit a GPU share.
    max_physical_batch: int | None = Field(None, ge=1)
    #: An existing Ray cluster to run the virtual sites on (``ray start --head`` printed its
    #: address: ``HOST:PORT``, ``auto`` or ``ray://HOST:PORT``); None starts Ray on this machine.
    ray_address: str | None = Field(None, min_length=1)
    #: Each virtual site's ``privacy.research_seed`` from the experiment seed: DP noise,
    #: sampling and replay membership rerun bit-identically, so DP configurations compare paired
    #: (the same draws in each). Off: the sites draw from the OS, as deployed sites do.
    research_seeds: bool = False
    faults: list[FaultSpec] = Field(default_factory=list)
    drift: list[DriftEventSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _faults_name_sites(self) -> SimulationSpec:
        for i, fault in enumerate(self.faults):
            if fault.site >= self.num_sites:
                raise ValueError(
                    f"faults[{i}].site = {fault.site}, but there are only {self.num_sites} "
                    f"virtual sites (0..{self.num_sites - 1})"
                )
            if fault.kind in ("disconnect", "stale") and fault.round < 2:
                raise ValueError(
                    f"faults[{i}]: a {fault.kind} needs round >= 2 (the site must have "
                    "answered a round before)"
                )
        for i, event in enumerate(self.drift):
            if event.site >= self.num_sites:
                raise ValueError(
                    f"drift[{i}].site = {event.site}, but there are only {self.num_sites} "
                    f"virtual sites (0..{self.num_sites - 1})"
                )
        return self


class ExperimentConfig(_Strict):
    """A whole federated continual-learning experiment."""

    name: str = "experiment"
    description: str = ""
    seed: int = 0
    stream: Literal["sequential", "joint"] = "sequential"
    min_sites: int | None = Field(None, ge=1)
    #: Canary (server/canary.py): when a round's candidate version is evaluated, promote it if
    #: it holds and roll it back if its mean accuracy is more than this below production's.
    canary_max_drop: float | None = Field(None, ge=0, le=1)
    #: The canary sites whose own accuracy judges a candidate (empty: the federation's).
    canary_sites: list[str] = Field(default_factory=list)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    dp: DPSpec = Field(default_factory=DPSpec)
    he: HESpec = Field(default_factory=HESpec)
    continual: ContinualSpec = Field(default_factory=ContinualSpec)
    simulation: SimulationSpec = Field(default_factory=SimulationSpec)
    drift: DriftSpec = Field(default_factory=DriftSpec)

    @model_validator(mode="after")
    def _drift_under_dp(self) -> ExperimentConfig:
        """Under DP the drift report is a Gaussian mechanism: it needs a sensitivity bound."""
        drift = self.drift
        if not (drift.enabled and self.dp.enabled):
            return self
        if drift.detector not in ("mmd", "ks"):
            raise ValueError(
                f"drift.detector = {drift.detector!r} has no sensitivity bound, so it cannot run "
                "under DP (dp is on); use 'mmd' or 'ks'"
            )
        if drift.calibration != "bootstrap":
            raise ValueError(
                f"drift.calibration = {drift.calibration!r} cannot run under DP (dp is on): "
                "only the keyed bootstrap has a sensitivity bound; use 'bootstrap'"
            )
        if drift.projection != "random":
            raise ValueError(
                "drift.projection = 'pca' is fitted on private data, so it cannot run under DP "
                "(dp is on); use 'random'"
            )
        return self

    @model_validator(mode="after")
    def _dp_training(self) -> ExperimentConfig:
        """Under DP, ``train`` holds what DP-SGD trains with (:func:`resolve_dp_training`)."""
        if self.dp.enabled:
            object.__setattr__(self, "train", resolve_dp_training(self.train))
        return self

    @model_validator(mode="after")
    def _he_sized_to_the_round(self) -> ExperimentConfig:
        """``he.max_sites`` unset: the most sites one round sums, so both ends pack alike.

        Filled in here (not left to each reader) because the coordinator and every site must
        derive the same packing from the experiment they share; ``he.model_fields_set`` still
        says whether the user chose it.
        """
        if self.he.max_sites is None:
            he = HESpec.model_construct(
                self.he.model_fields_set, **{**dict(self.he), "max_sites": self.round_sites}
            )
            object.__setattr__(self, "he", he)
        return self

    @property
    def round_sites(self) -> int:
        """The most sites one training round samples: ceil(expected × fraction_train)."""
        return max(1, math.ceil(self.expected_sites * self.strategy.fraction_train))

    @property
    def is_joint(self) -> bool:
        """All tasks at once (``stream = "joint"`` or ``continual.method = "joint"``)."""
        return self.stream == "joint" or self.continual.method == "joint"

    @property
    def evaluates_with_train(self) -> bool:
        """Whether sites evaluate the received model in the train message (one round trip)."""
        return self.evaluation.mode == "with_train" and self.canary_max_drop is None

    @property
    def expected_sites(self) -> int:
        """How many sites round 1 waits for (Flower samples before waiting otherwise)."""
        return self.min_sites if self.min_sites is not None else self.simulation.num_sites


def dp_recipe(train: TrainSpec) -> dict[str, Any]:
    """The built-in DP-SGD training settings for ``train``'s optimizer: the one owner of them.

    SGD: expected batch 128 and step size 1.0 (scaled by 1 − momentum, so the effective step
    stays 1.0), measured on digits class-IL with replay at ε = 8 (docs/notes/measurements.md,
    "DP training recipe"): a larger expected batch lowers the noise on the mean gradient, and
    a larger step makes the few, less noisy steps count. Weight average (``train.ema``) 0.9:
    at lr 1.0 it averages away part of the noise of the last steps (class-IL replay over 3
    seeds 0.644 → 0.671). Naive fine-tuning forgets at lr 1.0: the digits domain- and task-IL
    scenarios set lr 0.3, ema 0 in their ``[train.dp]``. Adam: nothing (the experiment's own
    values): batch 128 was measured worse with Adam twice (defects-domain-il 0.305 → 0.250,
    the dual encoder 0.544 → 0.494), and its per-coordinate scaling already sets the step.
    """
    if train.optimizer != "sgd":
        return {}
    momentum = train.dp.momentum
    if momentum is None:
        momentum = train.momentum if "momentum" in train.model_fields_set else 0.0
    return {"batch_size": 128, "lr": 1.0 * (1.0 - momentum), "momentum": momentum, "ema": 0.9}


def resolve_dp_training(train: TrainSpec) -> TrainSpec:
    """``train`` with each of :data:`DP_RECIPE_FIELDS` taken as DP-SGD should.

    In this order: ``[train.dp]``'s value; else ``[train]``'s if the experiment set it (an
    explicit value wins) and ``train.dp.base`` is ``"train"``; else :func:`dp_recipe`'s.
    ``--set train.lr=…`` on a scenario sets ``train.dp.lr`` too (:func:`pin_explicit_training`),
    so it wins over the scenario's ``[train.dp]``. Idempotent: a validated experiment, dumped
    and validated again (what every site does with the experiment it receives), resolves to
    the same values.
    """
    # The recipe is the optimizer's: resolve that first ([train.dp]'s, else [train]'s).
    recipe = dp_recipe(
        train.model_copy(update={"optimizer": train.dp.optimizer or train.optimizer})
    )
    values = {}
    for name in DP_RECIPE_FIELDS:
        chosen = getattr(train.dp, name)
        if chosen is None:
            explicit = name in train.model_fields_set and train.dp.base == "train"
            chosen = getattr(train, name) if explicit else recipe.get(name)
        if chosen is not None:
            values[name] = chosen
    return train.model_copy(update=values)


def pin_explicit_training(data: dict[str, Any], overrides: Any) -> dict[str, Any]:
    """Make each ``--set train.<field>=V`` of :data:`DP_RECIPE_FIELDS` hold under DP too.

    Why: a scenario's ``[train.dp]`` replaces ``[train]``'s values under DP, but a value the
    user sets on the command line is theirs and wins over both; ``--set train.dp.<field>``
    still sets the DP value alone. ``overrides`` are the ``key=value`` strings already applied
    to ``data``; the last one naming a field decides, as for any ``--set``.
    """
    train = data.get("train")
    if not isinstance(train, dict):
        return data
    last: dict[tuple[str, str], int] = {}
    for i, item in enumerate(overrides):
        parts = [p for p in item.partition("=")[0].strip().split(".") if p]
        # A table field (train.augment.shift) names its table: the whole table is pinned.
        if len(parts) >= 2 and parts[0] == "train" and parts[1] in DP_RECIPE_FIELDS:
            last[("train", parts[1])] = i
        elif len(parts) >= 3 and parts[:2] == ["train", "dp"] and parts[2] in DP_RECIPE_FIELDS:
            last[("dp", parts[2])] = i
    for name in DP_RECIPE_FIELDS:
        if last.get(("train", name), -1) > last.get(("dp", name), -1):
            dp = train.setdefault("dp", {})
            if isinstance(dp, dict):
                dp[name] = copy.deepcopy(train[name])
    return data
