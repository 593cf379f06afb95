"""Reference inference server: continuous batching over a paged KV cache, OpenAI-style HTTP API.

Entry point: ``python -m capstan_workloads.serve --model-dir DIR --port 8000``.
Importable API: :func:`capstan_workloads.serve.app.create_app`.
"""
