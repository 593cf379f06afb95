"""Capstan: a Kubernetes operator for large-model training (TrainingJob) and serving (ModelServing)."""

GROUP = "capstan.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__version__ = "0.1.0"
