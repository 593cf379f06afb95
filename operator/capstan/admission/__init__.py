"""Admission webhooks for TrainingJob and ModelServing (validating only).

* :func:`validate` (in :mod:`capstan.admission.validation`) is the pure check, tested without a
  server: cross-field rules the CRD schema cannot state, checks against the cluster's nodes, and
  everything the pydantic models say, each as ``field.path: reason and fix``.
* :mod:`capstan.admission.handlers` registers it with kopf (``@kopf.on.validate``) and lists
  Nodes for the capacity checks.
* :func:`configure_admission` wires kopf's webhook server from the mounted certificate
  (:class:`capstan.admission.server.ReviewServer`, which answers malformed AdmissionReviews with a
  400 or a denial instead of a 500).

**No mutating webhook, on purpose.** Defaults live in the CRD's structural schema, where the API
server applies them identically on every write and ``kubectl diff``/Argo CD/Flux account for
them. A mutating webhook that filled in fields would make the stored object differ from the one
in Git (perpetual OutOfSync) and add a network hop to every write for nothing. So no mutation
handler is registered and the Helm chart installs no MutatingWebhookConfiguration.

The handlers are registered only by :func:`configure_admission` when a certificate directory is
configured: a kopf operator that has admission handlers but no webhook server refuses to start,
so the local executor, tests and a chart installed with ``webhook.enabled=false`` get none.
Importing this package (the operator imports it if present) adds a kopf startup handler that
calls :func:`configure_admission`; calling it again from the operator's own startup is harmless.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import kopf

from capstan.admission.validation import validate
from capstan.config import ADDR_ENV, CERT_DIR_ENV, MANAGED_ENV, PORT_ENV, OperatorConfig
from capstan.labels import SKIP_CAPACITY_ANNOTATION

__all__ = [
    "ADDR_ENV",
    "CERT_DIR_ENV",
    "MANAGED_ENV",
    "PORT_ENV",
    "SKIP_CAPACITY_ANNOTATION",
    "WEBHOOK_IDS",
    "configure_admission",
    "validate",
]

log = logging.getLogger(__name__)

#: Handler ids, which kopf's server uses as URL paths: ``https://<service>:443/<id>``.
WEBHOOK_IDS = {"TrainingJob": "validate-trainingjobs", "ModelServing": "validate-modelservings"}


def configure_admission(
    settings: kopf.OperatorSettings,
    registry: kopf.OperatorRegistry | None = None,
    config: OperatorConfig | None = None,
) -> bool:
    """Serve the validating webhooks if ``config`` has a certificate directory
    (``$CAPSTAN_WEBHOOK_CERT_DIR``); return whether it has. ``config`` defaults to one that sets
    nothing (no webhooks).

    Call it from a ``@kopf.on.startup`` handler (or before ``kopf.run``): kopf reads webhook
    handlers and ``settings.admission`` only after startup handlers finish.
    """
    from capstan.admission.handlers import register, unregister

    config = OperatorConfig() if config is None else config
    cert_dir = config.webhook_cert_dir
    if not cert_dir:
        # An earlier run in this process (tests) may have registered them: kopf would refuse to
        # start with handlers but no server.
        unregister(registry)
        log.info("admission webhooks off: %s is not set", CERT_DIR_ENV)
        return False

    certfile, pkeyfile = Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key"
    missing = [str(p) for p in (certfile, pkeyfile) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{CERT_DIR_ENV}={cert_dir}: missing {', '.join(missing)}")
    from capstan.admission.server import ReviewServer

    register(registry)
    # kopf re-reads the files when they change (cert-manager renewals) and restarts the listener.
    # ReviewServer answers malformed reviews with a 400 or a denial, never a 500.
    settings.admission.server = ReviewServer(
        addr=config.webhook_addr,
        port=config.webhook_port,
        certfile=str(certfile),
        pkeyfile=str(pkeyfile),
    )
    settings.admission.managed = config.webhook_managed
    log.info("admission webhooks on: port %s, certificate from %s", settings.admission.server.port, cert_dir)
    return True


@kopf.on.startup(id="capstan-admission")
async def _configure_on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Wire the webhook server before kopf starts its root tasks (they wait for startup)."""
    # The operator's configuration (serve() reads it at start-up), else the environment's.
    configure_admission(settings, config=memo.get("config") or OperatorConfig.from_env())
