"""What each pipeline step returns: a frozen dataclass per step, and the small JSON dict it becomes in XCom.

``to_xcom()`` emits the contract's keys (the seed's ``data_extracted``, ``records``, ``features``, ...) beside the
real fields; ``from_xcom()`` reads such a dict back for the step downstream. A model version is ``model_version``
everywhere; deploy_model's and archive_model's dicts also keep the documented key ``version``.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

NO_NEW_DATA = "no new data"

Result = TypeVar("Result", bound="DataclassInstance")


@dataclass(frozen=True)
class Skip:
    """Why a step had nothing to do (an earlier one found no new data), and the Production version left in place."""

    reason: str
    production_version: int | None

    def fields(self) -> dict[str, Any]:
        return {"skipped_reason": self.reason, "production_version": self.production_version}

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any] | None) -> Skip | None:
        if not result or not result.get("skipped_reason"):
            return None
        return cls(str(result["skipped_reason"]), _int_or_none(result.get("production_version")))


@dataclass(frozen=True)
class ExtractResult:
    records: int
    source: str
    snapshot_uri: str
    digest: str
    columns: list[str]
    # What the registry repair at the start of the run changed, one line each (empty when nothing was wrong).
    repaired: list[str]
    # The Production version, when it was trained on this very data (same digest).
    trained_on_same_data: int | None = None
    skip: Skip | None = None

    def to_xcom(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "data_extracted": True,
            **_field_values(self, leave_out={"trained_on_same_data"}),
            "unchanged": self.trained_on_same_data is not None,
        }
        if self.trained_on_same_data is not None:
            result["production_version"] = self.trained_on_same_data
        return result | (self.skip.fields() if self.skip else {})

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> ExtractResult:
        if not result.get("data_extracted"):
            raise ValueError("Data extraction failed")
        return _from_fields(
            cls,
            result,
            trained_on_same_data=_int_or_none(result.get("production_version")) if result.get("unchanged") else None,
            skip=Skip.from_xcom(result),
        )


@dataclass(frozen=True)
class TransformResult:
    """The validated data, split: where the train and test sets are and what their columns mean."""

    feature_names: list[str]
    label_column: str
    digest: str
    snapshot_uri: str
    classes: list[Any] = field(default_factory=list)
    train_uri: str = ""
    test_uri: str = ""
    train_rows: int = 0
    test_rows: int = 0
    # The MLflow run of this DAG run's training: each candidate's run is a child of it.
    parent_run_id: str = ""
    skip: Skip | None = None

    def to_xcom(self) -> dict[str, Any]:
        if self.skip:
            return {
                "data_transformed": False,
                "features": len(self.feature_names),
                "digest": self.digest,
                **self.skip.fields(),
            }
        return {"data_transformed": True, "features": len(self.feature_names), **_field_values(self)}

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> TransformResult:
        skip = Skip.from_xcom(result)
        if skip is not None:
            return cls(feature_names=[], label_column="", digest=str(result["digest"]), snapshot_uri="", skip=skip)
        if not result.get("data_transformed"):
            raise ValueError("Data transformation failed")
        return _from_fields(cls, result)


def candidate_name(index: int, model_family: str) -> str:
    """How a candidate is named wherever it is shown: its place in the run's list, from 1, and its family."""
    return f"#{index + 1} {model_family}"


@dataclass(frozen=True)
class CandidateResult:
    """One trained candidate (train_candidate's XCom): where its model is in MLflow, and its scores on the selection
    split (none with a single candidate, which nothing is chosen among). Metadata only: the model stays in MLflow."""

    index: int
    model_family: str
    hyperparameters: dict[str, Any]
    run_id: str
    model_uri: str
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return candidate_name(self.index, self.model_family)

    def to_xcom(self) -> dict[str, Any]:
        return {"candidate_trained": True, **_field_values(self)}

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> CandidateResult:
        return _from_fields(cls, result)


@dataclass(frozen=True)
class TrainResult:
    model_name: str
    model_version: int | None = None
    accuracy: float | None = None
    # The MLflow run whose model is the version: the chosen candidate's, a child of parent_run_id.
    run_id: str = ""
    model_family: str = ""
    # drift.result_fields(): the largest PSI and its feature, whether drift is high, against which version.
    drift: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str = ""
    # Every candidate of the run as ml.selection.summary() writes it, and why the chosen one won.
    candidates: list[dict[str, Any]] = field(default_factory=list)
    selection: str = ""
    selection_metric: str = ""
    skip: Skip | None = None

    @property
    def drift_max_psi(self) -> float | None:
        return self.drift.get("drift_max_psi")

    def to_xcom(self) -> dict[str, Any]:
        if self.skip:
            return {
                "model_trained": False,
                "accuracy": None,
                "model_name": self.model_name,
                "model_version": None,
                **self.skip.fields(),
            }
        return {
            "model_trained": True,
            **_field_values(self, leave_out={"drift"}),
            "model_uri": f"models:/{self.model_name}/{self.model_version}",
            **self.drift,
        }

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> TrainResult:
        skip = Skip.from_xcom(result)
        if skip is not None:
            return cls(model_name=str(result["model_name"]), skip=skip)
        if not result.get("model_trained"):
            raise ValueError("Model training failed")
        return _from_fields(cls, result, drift=_drift_fields(result))


@dataclass(frozen=True)
class ValidateResult:
    model_name: str
    model_version: int | None
    passed: bool
    accuracy: float | None
    reasons: list[str]
    threshold: float | None = None
    champion_version: int | None = None
    champion_accuracy: float | None = None
    run_id: str = ""
    drift: dict[str, Any] = field(default_factory=dict)
    drift_margin_required: float | None = None
    # What the comparison with Production was made on (see evaluation.ComparisonRows); None without a comparison.
    comparison_rows: int | None = None
    comparison_excluded_rows: int | None = None
    comparison_accuracy: float | None = None
    comparison_note: str | None = None
    skip: Skip | None = None

    @property
    def status(self) -> str:
        return "skipped" if self.skip else "passed" if self.passed else "failed"

    def to_xcom(self) -> dict[str, Any]:
        if self.skip:
            return {
                "validation": self.status,
                "accuracy": None,
                "reasons": self.reasons,
                "model_version": None,
                **self.skip.fields(),
            }
        return {"validation": self.status, **_field_values(self, leave_out={"passed", "drift"}), **self.drift}

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> ValidateResult:
        reasons = [str(reason) for reason in result.get("reasons") or []]
        skip = Skip.from_xcom(result)
        if skip is not None:
            return cls(model_name="", model_version=None, passed=False, accuracy=None, reasons=reasons, skip=skip)
        return _from_fields(
            cls, result, passed=result["validation"] == "passed", reasons=reasons, drift=_drift_fields(result)
        )


@dataclass(frozen=True)
class DeployResult:
    deployed: bool
    model_name: str
    model_version: int | None
    previous_version: int | None
    promoted: bool
    health_check: str
    reason: str
    skip: Skip | None = None
    # Who approved the promotion and when, where a person had to (ApprovalResult.describe); empty otherwise.
    approval: str = ""

    def to_xcom(self) -> dict[str, Any]:
        return {**_field_values(self), "version": self.model_version} | (self.skip.fields() if self.skip else {})

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> DeployResult:
        return _from_fields(cls, result, skip=Skip.from_xcom(result))


# The task that asks a person to approve a validated version before deploy_model promotes it (ml.approval), and the
# answers it offers.
APPROVAL_TASK = "approve_deployment"
APPROVE, REJECT = "Approve", "Reject"


@dataclass(frozen=True)
class ApprovalResult:
    """A person's answer to the approval request before Production (approve_deployment's XCom)."""

    approved: bool
    # The user who answered, as Airflow knows them; empty when nobody answered in time.
    decided_by: str
    decided_at: str
    timed_out: bool = False

    def describe(self) -> str:
        if self.timed_out:
            return f"not approved: nobody answered the approval request by {self.decided_at}"
        verdict = "approved" if self.approved else "rejected"
        return f"{verdict} by {self.decided_by} at {self.decided_at}"

    def to_xcom(self) -> dict[str, Any]:
        return _field_values(self)

    @classmethod
    def from_xcom(cls, result: Mapping[str, Any]) -> ApprovalResult:
        return _from_fields(cls, result)


@dataclass(frozen=True)
class ArchiveResult:
    archived: bool
    model_version: int | None
    record: dict[str, Any] = field(default_factory=dict)
    skip: Skip | None = None

    def to_xcom(self) -> dict[str, Any]:
        return {**_field_values(self), "version": self.model_version} | (self.skip.fields() if self.skip else {})


@dataclass(frozen=True)
class RollbackResult:
    rollback_performed: bool
    production_version: int | None
    reason: str
    restored_version: int | None = None
    rolled_back_version: int | None = None
    skip: Skip | None = None

    def to_xcom(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "rollback_performed": self.rollback_performed,
            "restored_version": self.restored_version,
            "reason": self.reason,
        }
        if self.skip:
            result["skipped_reason"] = self.skip.reason
        if self.rollback_performed:
            result["rolled_back_version"] = self.rolled_back_version
        return result | {"production_version": self.production_version}


@dataclass(frozen=True)
class ManualRollbackResult:
    replaced_version: int | None
    production_version: int
    reason: str

    def to_xcom(self) -> dict[str, Any]:
        return {
            "rollback_performed": True,
            "replaced_version": self.replaced_version,
            "production_version": self.production_version,
            "reason": self.reason,
        }


def _field_values(result: DataclassInstance, leave_out: Set[str] = frozenset()) -> dict[str, Any]:
    """The result's fields under their own names, as XCom carries them (the skip is emitted as its own keys)."""
    return {item.name: getattr(result, item.name) for item in fields(result) if item.name not in {"skip", *leave_out}}


def _from_fields(cls: type[Result], result: Mapping[str, Any], **computed: Any) -> Result:
    """The result ``cls`` read back from its XCom dict: each field from the key of its name, unless ``computed``.

    The values went to XCom as JSON from ``to_xcom()``, so they come back with the types the fields declare.
    """
    named = {item.name: result[item.name] for item in fields(cls) if item.name in result and item.name not in computed}
    return cls(**named, **computed)


def _drift_fields(result: Mapping[str, Any]) -> dict[str, Any]:
    """The drift.result_fields() entries of a train or validate result (validation's own margin aside)."""
    return {key: value for key, value in result.items() if key.startswith("drift_") and key != "drift_margin_required"}


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)
