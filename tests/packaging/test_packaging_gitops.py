"""docs/gitops.md: the Argo CD health checks (Lua) give the documented health for each phase."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
from capstan_pkg import ROOT, tool

DOC = ROOT / "docs" / "gitops.md"
LUA = tool("lua5.4") or tool("lua")


def scripts() -> dict[str, str]:
    blocks = re.findall(r"```lua\n(.*?)```", DOC.read_text(), re.S)
    return {b.splitlines()[0].removeprefix("-- ").strip(): b for b in blocks}


def lua_literal(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    return json.dumps(value)


def health(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    assert LUA is not None
    program = f"local obj = {lua_literal(obj)}\nlocal function check()\n{script}\nend\n" \
              "local hs = check()\nio.write(hs.status .. '\\n' .. (hs.message or ''))\n"
    out = subprocess.run([LUA, "-"], input=program, capture_output=True, text=True, timeout=10, check=True)
    status, _, message = out.stdout.partition("\n")
    return status, message


def test_doc_has_both_scripts() -> None:
    assert set(scripts()) == {"trainingjob.lua", "modelserving.lua"}


def _obj(phase: str | None, generation: int = 1, observed: int = 1, **status: Any) -> dict[str, Any]:
    st = {"phase": phase, "observedGeneration": observed, **status} if phase else {}
    return {"metadata": {"name": "x", "generation": generation}, "status": st}


@pytest.mark.skipif(LUA is None, reason="no Lua interpreter (apt-get install lua5.4)")
@pytest.mark.parametrize(
    ("phase", "want"),
    [(None, "Progressing"), ("Pending", "Progressing"), ("Queued", "Progressing"),
     ("Starting", "Progressing"), ("Restarting", "Progressing"), ("Running", "Healthy"),
     ("Succeeded", "Healthy"), ("Failed", "Degraded"), ("Suspended", "Suspended")],
)
def test_trainingjob_health(phase: str | None, want: str) -> None:
    status, message = health(scripts()["trainingjob.lua"], _obj(phase, message="waiting for capacity"))
    assert status == want
    if phase:
        assert message.startswith(phase)


@pytest.mark.skipif(LUA is None, reason="no Lua interpreter (apt-get install lua5.4)")
def test_modelserving_health() -> None:
    script = scripts()["modelserving.lua"]
    assert health(script, _obj(None))[0] == "Progressing"
    assert health(script, _obj("Progressing"))[0] == "Progressing"
    assert health(script, _obj("Ready"))[0] == "Healthy"
    assert health(script, _obj("Degraded"))[0] == "Degraded"
    assert health(script, _obj("Failed"))[0] == "Degraded"
    rolled = _obj("Ready", conditions=[{"type": "RolledBack", "status": "True", "message": "p99 too high"}])
    status, message = health(script, rolled)
    assert status == "Degraded" and "p99 too high" in message
    cleared = _obj("Ready", conditions=[{"type": "RolledBack", "status": "False"}])
    assert health(script, cleared)[0] == "Healthy"


@pytest.mark.skipif(LUA is None, reason="no Lua interpreter (apt-get install lua5.4)")
def test_unobserved_spec_change_is_progressing() -> None:
    for name, phase in (("trainingjob.lua", "Running"), ("modelserving.lua", "Ready")):
        status, message = health(scripts()[name], _obj(phase, generation=3, observed=2))
        assert status == "Progressing" and "not reconciled" in message
