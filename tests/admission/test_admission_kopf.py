"""kopf wiring of the webhooks: registration only when a certificate is configured, ids = URL paths."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import kopf
import pytest
from tests.api.bodies import make_trainingjob

from capstan.admission import ADDR_ENV, CERT_DIR_ENV, MANAGED_ENV, WEBHOOK_IDS, configure_admission, handlers
from capstan.config import OperatorConfig


def _certs(tmp_path: Path) -> Path:
    (tmp_path / "tls.crt").write_text("cert")
    (tmp_path / "tls.key").write_text("key")
    return tmp_path


def test_import_installs_a_startup_hook() -> None:
    ids = [h.id for h in kopf.get_default_registry()._activities.get_all_handlers()]
    assert "capstan-admission" in ids
    # ...which registers no webhook handler by itself (no certificate configured here).
    assert kopf.get_default_registry()._webhooks.get_all_handlers() == []


def test_off_without_cert_dir() -> None:
    settings, registry = kopf.OperatorSettings(), kopf.OperatorRegistry()
    assert configure_admission(settings, registry, OperatorConfig.from_env({})) is False
    assert settings.admission.server is None
    assert registry._webhooks.get_all_handlers() == []


def test_on_with_cert_dir(tmp_path: Path) -> None:
    settings, registry = kopf.OperatorSettings(), kopf.OperatorRegistry()
    env = {CERT_DIR_ENV: str(_certs(tmp_path))}
    assert configure_admission(settings, registry, OperatorConfig.from_env(env)) is True
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert server.port == 9443 and server.certfile == str(tmp_path / "tls.crt")
    assert settings.admission.managed is None  # Helm owns the webhook configurations
    ids = sorted(h.id for h in registry._webhooks.get_all_handlers())
    assert ids == sorted(WEBHOOK_IDS.values())
    # Idempotent: a second call registers nothing new.
    configure_admission(settings, registry, OperatorConfig.from_env(env))
    assert len(registry._webhooks.get_all_handlers()) == 2


def test_managed_port_and_address_from_env(tmp_path: Path) -> None:
    settings, registry = kopf.OperatorSettings(), kopf.OperatorRegistry()
    env = {CERT_DIR_ENV: str(_certs(tmp_path)), MANAGED_ENV: "capstan.dev", "CAPSTAN_WEBHOOK_PORT": "10443"}
    configure_admission(settings, registry, OperatorConfig.from_env(env))
    assert settings.admission.managed == "capstan.dev"
    assert settings.admission.server.port == 10443  # type: ignore[union-attr]
    assert settings.admission.server.addr == "0.0.0.0"  # type: ignore[union-attr]
    configure_admission(settings, registry, OperatorConfig.from_env({**env, ADDR_ENV: "127.0.0.1"}))
    assert settings.admission.server.addr == "127.0.0.1"  # type: ignore[union-attr]


def test_a_later_run_without_cert_dir_drops_the_handlers(tmp_path: Path) -> None:
    # Operators started one after another in one process (tests): kopf refuses to start with
    # admission handlers but no server, so a run without certificates must not inherit them.
    registry = kopf.OperatorRegistry()
    certs = OperatorConfig.from_env({CERT_DIR_ENV: str(_certs(tmp_path))})
    configure_admission(kopf.OperatorSettings(), registry, certs)
    assert len(registry._webhooks.get_all_handlers()) == 2
    assert configure_admission(kopf.OperatorSettings(), registry, OperatorConfig.from_env({})) is False
    assert registry._webhooks.get_all_handlers() == []
    configure_admission(kopf.OperatorSettings(), registry, certs)
    assert len(registry._webhooks.get_all_handlers()) == 2


def test_missing_cert_files_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tls\.crt"):
        env = {CERT_DIR_ENV: str(tmp_path)}
        configure_admission(kopf.OperatorSettings(), kopf.OperatorRegistry(), OperatorConfig.from_env(env))


class _Nodes:
    def __init__(self, nodes: list[dict[str, Any]] | Exception) -> None:
        self.result = nodes

    async def nodes(self, api: Any = None) -> list[dict[str, Any]]:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def _body(gpus: int) -> kopf.Body:
    return kopf.Body(make_trainingjob("big").namespace("a").image("i").workers(1).gpus(gpus).obj())


def test_review_denies_with_every_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    node = {"metadata": {"name": "n"}, "status": {"allocatable": {"nvidia.com/gpu": "8"}}}
    monkeypatch.setattr(handlers, "NODES", _Nodes([node]))
    warnings: list[str] = []
    with pytest.raises(kopf.AdmissionError, match=r"TrainingJob 'big' is invalid: spec.gpusPerWorker: 16"):
        asyncio.run(handlers.review(body=_body(16), warnings=warnings))
    asyncio.run(handlers.review(body=_body(8), warnings=warnings))
    assert warnings == []


def test_review_fails_open_on_capacity_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "NODES", _Nodes(RuntimeError("apiserver down")))
    warnings: list[str] = []
    asyncio.run(handlers.review(body=_body(16), warnings=warnings))
    assert warnings and "capacity checks skipped" in warnings[0]
