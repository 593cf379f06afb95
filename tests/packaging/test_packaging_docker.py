"""The Dockerfiles: multi-stage, pinned base, non-root; the operator image has no torch."""

from __future__ import annotations

import re

import pytest
from capstan_pkg import ROOT

DOCKERFILE = ROOT / "operator" / "Dockerfile"


def test_operator_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "base image must be an ARG default"
    # An exact patch version (or a digest), never a floating tag such as 3.11-slim or latest.
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base.group(1))
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0") and user[-1].split(":")[0].isdigit()
    assert "torch" not in re.sub(r"#.*", "", text).replace('import torch"', "")
    assert re.search(r'^ENTRYPOINT \["capstan"\]', text, re.M)


@pytest.mark.parametrize(("name", "entry"), [("Dockerfile.trainer", "train"), ("Dockerfile.server", "serve")])
def test_workload_dockerfiles(name: str, entry: str) -> None:
    text = (ROOT / "workloads" / name).read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base.group(1))
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    # The CPU torch index by default: a plain `pip install torch` would pull a CUDA build.
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu", text)
    assert "torch==2.13.0" in text
    assert re.search(rf'^ENTRYPOINT \["python", "-m", "capstan_workloads\.{entry}"', text, re.M)
