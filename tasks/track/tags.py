"""The vocabulary requant writes into MLflow: tag keys on runs and versions, and the decision file."""

__all__ = [
    "TAG_KEY",
    "TAG_OUTCOME",
    "TAG_SOURCE_URI",
    "TAG_SOURCE_VERSION",
    "TAG_SOURCE_DIGEST",
    "TAG_RECIPE",
    "TAG_CANDIDATE",
    "TAG_CONFIG_HASH",
    "TAG_DATA_VERSION",
    "TAG_ACCURACY",
    "TAG_MONTHLY_COST",
    "TAG_INSTANCE_TYPE",
    "TAG_FAILURE",
    "TAG_PRODUCTION_BROKEN",
    "TAG_MODEL_SHA256",
    "TAG_PARENT_RUN",
    "TAG_PROMOTED_VERSION",
    "TAG_PROMOTION",
    "TAG_PROCESS",
    "TAG_RECONCILED",
    "TAG_PROMOTED_ALIAS",
    "TAG_PREVIOUS_PRODUCTION",
    "TAG_ROLLED_BACK_AT",
    "TAG_ROLLED_BACK_BY",
    "TAG_ROLLBACK_REASON",
    "TAG_ROLLED_BACK_TO",
    "TAG_ROLLBACK_RUN",
    "TAG_KIND",
    "DECISION_FILE",
]

# Tags that tie a registered version to what produced it.
TAG_KEY = "requant.decision_key"
TAG_OUTCOME = "requant.outcome"
TAG_SOURCE_URI = "requant.source_uri"
TAG_SOURCE_VERSION = "requant.source_version"
TAG_SOURCE_DIGEST = "requant.source_digest"
TAG_RECIPE = "requant.recipe"
TAG_CANDIDATE = "requant.candidate"
TAG_CONFIG_HASH = "requant.config_hash"
TAG_DATA_VERSION = "requant.data_version"
TAG_ACCURACY = "requant.accuracy"
TAG_MONTHLY_COST = "requant.monthly_cost_usd"
# The hardware profile (instance type) a version was priced on: where it should be served.
TAG_INSTANCE_TYPE = "requant.instance_type"
TAG_FAILURE = "requant.failure"
# Why the version behind the production alias did not load from the registry as the served model.
TAG_PRODUCTION_BROKEN = "requant.production_broken"
TAG_MODEL_SHA256 = "requant.model_sha256"
TAG_PARENT_RUN = "requant.parent_run_id"
TAG_PROMOTED_VERSION = "requant.promoted_version"
# "pending" once the decision is recorded and before the alias moves, "done" after the read-back.
TAG_PROMOTION = "requant.promotion"
# host:pid:start-time of the process that runs a run, so a later run can tell a dead one from a live one.
TAG_PROCESS = "requant.process"
TAG_RECONCILED = "requant.reconciled"
# The alias a run moved to its winner (production, or challenger with registry.rollout: challenger).
TAG_PROMOTED_ALIAS = "requant.promoted_alias"
# On a version: the version production pointed at before the alias moved to it (where a rollback goes).
TAG_PREVIOUS_PRODUCTION = "requant.previous_production"
# On a version taken out of production by `requant rollback`: when, by whom, why, and to which version.
TAG_ROLLED_BACK_AT = "requant.rolled_back_at"
TAG_ROLLED_BACK_BY = "requant.rolled_back_by"
TAG_ROLLBACK_REASON = "requant.rollback_reason"
TAG_ROLLED_BACK_TO = "requant.rolled_back_to"
TAG_ROLLBACK_RUN = "requant.rollback_run"
# What kind of run a non-requantize run is: rollout, rollback, loadtest.
TAG_KIND = "requant.kind"
# The decision record every parent run logs (decision.json).
DECISION_FILE = "decision.json"
