"""The Kubernetes shell of Capstan: an async API client, kopf handlers and the operator entry.

Everything here does I/O; the decisions are made by the pure planners (``capstan.training``,
``capstan.serving``) and the placement engine (``capstan.topology``).
"""
