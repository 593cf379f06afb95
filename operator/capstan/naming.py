"""Deterministic child names and label values that stay valid for any legal object name (the
label keys are in :mod:`capstan.labels`)."""

from __future__ import annotations

import hashlib
import re

from capstan.labels import LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, LABEL_PART_OF

DNS_LABEL_MAX = 63
_INVALID = re.compile(r"[^a-z0-9-]+")

MANAGER = "capstan"


def short_hash(text: str, length: int = 8) -> str:
    """A stable hex digest prefix of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(name: str, suffix: str = "", max_len: int = DNS_LABEL_MAX) -> str:
    """``name`` + ``suffix`` as an RFC 1035 label (Service names, hostnames): at most ``max_len``
    characters, lowercase alphanumerics and '-', starting with a letter.

    Names that had to change (too long, dots, a leading digit) get a hash of the original so two
    different resources never share a child name.
    """
    clean = _INVALID.sub("-", name.lower()).strip("-") or "x"
    changed = clean != name
    if not clean[0].isalpha():
        clean, changed = f"c-{clean}", True
    if changed or len(clean) + len(suffix) > max_len:
        digest = short_hash(name)
        room = max_len - len(suffix) - len(digest) - 1
        clean = f"{clean[:room].rstrip('-')}-{digest}"
    return f"{clean}{suffix}"


def label_value(value: str) -> str:
    """A label value (max 63 characters, alphanumeric at both ends) standing for ``value``."""
    if len(value) <= DNS_LABEL_MAX and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", value):
        return value
    return dns_label(value)


def common_labels(kind: str, instance: str, component: str) -> dict[str, str]:
    """The ``app.kubernetes.io/*`` labels every child object carries."""
    return {
        LABEL_NAME: kind,
        LABEL_INSTANCE: label_value(instance),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_PART_OF: MANAGER,
    }


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, object]:
    """A controller ownerReference, so children are garbage-collected with their owner."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
