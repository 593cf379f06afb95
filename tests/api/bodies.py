"""One builder of TrainingJob and ModelServing bodies for every test tier (JobSet's
``MakeJobSet(...).Obj()`` is the model)::

    body = make_trainingjob("gpt").namespace("ml").workers(4).gpus(8).spec(queueName="q").obj()
    job = make_trainingjob("gpt").uid("u1").status(phase="Running").model()   # a parsed TrainingJob
    serving = make_modelserving("m").pvc("models").spec(replicas=2).obj()

Each starts from a minimal valid body (a TrainingJob of two workers of image ``img``; a
ModelServing of an object-store model); every method returns the builder; ``obj()`` gives a fresh
dict each time and ``model()`` the parsed resource. :func:`tj` and :func:`ms` are the minimal
bodies with spec fields overridden by keyword.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, Self, TypeVar

from capstan import API_VERSION
from capstan.api.loading import parse_object
from capstan.api.modelserving import ModelServing
from capstan.api.trainingjob import TrainingJob

_R = TypeVar("_R", TrainingJob, ModelServing)


class _Builder(Generic[_R]):
    _kind: type[_R]

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self._body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": self._kind.__name__,
            "metadata": {"name": name},
            "spec": spec,
        }

    def namespace(self, namespace: str) -> Self:
        """Set ``metadata.namespace``."""
        return self.meta(namespace=namespace)

    def uid(self, uid: str) -> Self:
        """Set ``metadata.uid`` (as the API server would)."""
        return self.meta(uid=uid)

    def generation(self, generation: int) -> Self:
        """Set ``metadata.generation`` (as the API server would)."""
        return self.meta(generation=generation)

    def meta(self, **fields: Any) -> Self:
        """Set ``metadata`` fields (labels, annotations, creationTimestamp, ...)."""
        self._body["metadata"].update(fields)
        return self

    def spec(self, **fields: Any) -> Self:
        """Set (replace) top-level ``spec`` fields."""
        self._body["spec"].update(fields)
        return self

    def without(self, *fields: str) -> Self:
        """Drop top-level ``spec`` fields (e.g. a default the builder set)."""
        for name in fields:
            self._body["spec"].pop(name, None)
        return self

    def status(self, **fields: Any) -> Self:
        """Set ``status`` fields."""
        self._body.setdefault("status", {}).update(fields)
        return self

    def obj(self) -> dict[str, Any]:
        """The body, as a fresh dict."""
        return copy.deepcopy(self._body)

    def model(self) -> _R:
        """The body parsed into its pydantic model."""
        res = parse_object(self.obj())
        assert isinstance(res, self._kind)
        return res


class TrainingJobBuilder(_Builder[TrainingJob]):
    """A TrainingJob body; see the module docstring."""

    _kind = TrainingJob

    def __init__(self, name: str = "gpt") -> None:
        super().__init__(name, {"image": "img", "workers": 2})

    def image(self, image: str, *command: str) -> Self:
        """The workers' image, and their command when given."""
        self.spec(image=image)
        return self.spec(command=list(command)) if command else self

    def workers(self, workers: int) -> Self:
        """``spec.workers``."""
        return self.spec(workers=workers)

    def gpus(self, gpus_per_worker: int) -> Self:
        """``spec.gpusPerWorker``."""
        return self.spec(gpusPerWorker=gpus_per_worker)


class ModelServingBuilder(_Builder[ModelServing]):
    """A ModelServing body; see the module docstring."""

    _kind = ModelServing

    def __init__(self, name: str = "m") -> None:
        super().__init__(name, {"model": {"uri": "s3://b/m"}})

    def uri(self, uri: str) -> Self:
        """Serve the model at ``uri``."""
        return self.spec(model={"uri": uri})

    def pvc(self, claim_name: str) -> Self:
        """Serve the model on PersistentVolumeClaim ``claim_name``."""
        return self.spec(model={"pvc": {"claimName": claim_name}})

    def from_training_job(self, name: str, checkpoint: str | None = None) -> Self:
        """Serve what TrainingJob ``name`` exported (or its ``checkpoint``)."""
        ref = {"name": name, **({"checkpoint": checkpoint} if checkpoint else {})}
        return self.spec(model={"fromTrainingJob": ref})

    def replicas(self, replicas: int) -> Self:
        """``spec.replicas``."""
        return self.spec(replicas=replicas)


def make_trainingjob(name: str = "gpt") -> TrainingJobBuilder:
    """A builder of TrainingJob ``name``: two workers of image ``img``."""
    return TrainingJobBuilder(name)


def make_modelserving(name: str = "m") -> ModelServingBuilder:
    """A builder of ModelServing ``name``: a model at ``s3://b/m``."""
    return ModelServingBuilder(name)


def tj(**spec: Any) -> dict[str, Any]:
    """A TrainingJob ``gpt`` with two workers of image ``img``, plus ``spec``."""
    return make_trainingjob().spec(**spec).obj()


def ms(**spec: Any) -> dict[str, Any]:
    """A ModelServing ``m`` of an object-store model, plus ``spec``."""
    return make_modelserving().spec(**spec).obj()
