"""The operator Dockerfile: multi-stage, pinned base, non-root, no torch."""

from __future__ import annotations

import re

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
