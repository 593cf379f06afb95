"""The Capstan API: pydantic models that are the single source of truth for the CRDs."""

from capstan.api.common import Condition, ObjectMeta
from capstan.api.modelserving import ModelServing, ModelServingSpec, ModelServingStatus
from capstan.api.trainingjob import TrainingJob, TrainingJobSpec, TrainingJobStatus

__all__ = [
    "Condition",
    "ModelServing",
    "ModelServingSpec",
    "ModelServingStatus",
    "ObjectMeta",
    "TrainingJob",
    "TrainingJobSpec",
    "TrainingJobStatus",
]
