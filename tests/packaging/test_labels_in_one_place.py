"""Label keys, annotation keys and resource names live in capstan.labels alone: a key the planner
writes and the operator reads back is then one constant, never two spellings of one string."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import capstan
from capstan import labels

PACKAGE = Path(capstan.__file__).parent
#: A whole string that is a prefixed key: ``capstan.dev/rank``, ``nvidia.com/gpu``. apiVersions
#: (``capstan.dev/v1alpha1``) are names of API groups, not keys.
KEY = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+/[A-Za-z0-9._-]+$")
API_VERSION = re.compile(r"/v\d+((alpha|beta)\d+)?$")


def test_no_module_but_capstan_labels_spells_a_label_or_annotation_key() -> None:
    spelled = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != Path(labels.__file__)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and KEY.match(node.value)
        and not API_VERSION.search(node.value)
    ]
    assert spelled == [], "import these keys from capstan.labels:\n" + "\n".join(spelled)
