"""Names on the wire between coordinator and sites (record keys and config keys).

Both sides import these constants so a renamed key is a one-line change, not a silent mismatch.
"""

from .vocabulary import SiteStatus

ARRAYS = "arrays"  # ArrayRecord: model weights (plaintext) or ciphertext blocks
CONFIG = "config"  # ConfigRecord: instructions from the coordinator
METRICS = "metrics"  # MetricRecord: numbers a site reports
SITE = "site"  # ConfigRecord: who replied and how it went

# Keys of the coordinator's ConfigRecord.
EXPERIMENT = "experiment"  # the validated experiment as canonical JSON
RUN_ID = "run-id"
SERVER_ROUND = "server-round"
TASK_INDEX = "task-index"
ROUND_IN_TASK = "round-in-task"
SITES_DIR = "sites-dir"  # simulations only: where site-<partition-id>.toml live
PROXIMAL_MU = "proximal-mu"
#: In a train message: evaluate the model it carries first, as the output of this server round
#: (0: the untrained model); absent, the site only trains (evaluation.mode, docs/DESIGN.md §3).
EVALUATE_ROUND = "evaluate-round"

# Continual learning (EWC): the coordinator sends the summed Fisher of every consolidated task
# and the global model they were computed at; sites rebuild the same memory from them.
CONSOLIDATE = "train.consolidate"  # message type of the end-of-task Fisher round
VERIFY = "query.verify"  # message type: does this group sum of ciphertexts verify? (HE)
VERIFIED = "verified"  # its reply's one metric: 1 (the group sum is intact) or 0
FISHER = "fisher"  # site -> coordinator: F·n (+ COUNT_ARRAY); coordinator -> site: FISHER-k
FISHER_TASKS = "fisher-tasks"  # how many FISHER-k records the message carries
ANCHOR = "anchor"  # ArrayRecord: θ* (the global model at the end of the last consolidated task)
COUNT_ARRAY = "__count__"  # a one-element array holding an example count inside an ArrayRecord

HE_META = "ckks"  # ConfigRecord beside an encrypted ArrayRecord (``ckks:<key>`` for others)
CKKS_BLOCK_PREFIX = "ckks-"  # Array names of ciphertext blocks (fedcl.privacy.ckks.wire)
CKKS_BLOCK_STYPE = "ckks"  # their Array stype

# Keys of the site's records.
SITE_ID = "site-id"
STATUS = "status"  # one of STATUSES
DETAIL = "detail"
NUM_EXAMPLES = "num-examples"
MODEL_SHA256 = "model-sha256"  # SHA-256 of the global model the site trained from
AGGREGATE_CORRUPT = "aggregate-corrupt"  # set when the aggregate a site got fails its checksum
EWC_DIGEST = "ewc-digest"  # SHA-256 of the site's EWC memory (empty before the first task)
TRAIN_LOSS = "train-loss"
HE_DECRYPT_S = "he-decrypt-s"  # seconds a site took to decrypt the model it was sent (HE)
HE_ENCRYPT_S = "ckks-encrypt-seconds"  # a site's time to encrypt its update (the CKKS codec's)
EVALUATION = "evaluation"  # MetricRecord in a train reply: the received model's evaluation
EVALUATION_STATUS = "evaluation-status"  # set (refused) when that evaluation was refused
EVALUATION_DETAIL = "evaluation-detail"  # and why

# Privacy a DP site reports having spent (it accounts; the coordinator only records).
DP_EPSILON_RUN = "dp-epsilon-run"
DP_EPSILON_LIFETIME = "dp-epsilon-lifetime"
DP_DELTA = "dp-delta"
DP_BUDGET = "dp-budget"

# Drift (docs/DESIGN.md §12): the coordinator asks each site about the model it holds; the reply
# carries two scores and their alert bits, nothing else about the site's data.
DRIFT = "query.drift"  # message type of a drift report
DRIFT_SCORE = "drift-score"  # the distribution test's calibrated score: alerts above 1
DRIFT_ALERT = "drift-alert"  # 1 when it alerts
DRIFT_RATE_SHIFT = "drift-rate-shift"  # largest move of one predicted class's rate
DRIFT_RATE_ALERT = "drift-rate-alert"  # 1 when that move exceeds drift.trigger.rate_change

# What a site may say of its own reply (``rejected`` is the coordinator's word, not a site's).
STATUS_OK = SiteStatus.OK
STATUS_FAILED = SiteStatus.FAILED
STATUS_REFUSED = SiteStatus.REFUSED
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_REFUSED)


def eval_key(kind: str, task: int) -> str:
    """Per-task evaluation counters: ``correct-t3``, ``count-t3``, ``loss-t3``."""
    return f"{kind}-t{task}"


def fisher_key(task: int) -> str:
    """Record key of task ``task``'s summed Fisher in a coordinator message."""
    return f"{FISHER}-{task}"


def meta_key(record_key: str) -> str:
    """Where the CKKS metadata of an encrypted record travels (``ckks`` for the model)."""
    return HE_META if record_key == ARRAYS else f"{HE_META}:{record_key}"
