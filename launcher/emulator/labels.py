"""Google Cloud's rules for labels, which each emulated API that takes labels applies to them.

https://cloud.google.com/resource-manager/docs/labels-overview ("Requirements for labels").
"""

from __future__ import annotations

from collections.abc import Mapping

from launcher.emulator.rpc import invalid

# As resources.proto writes them for Secret.labels: keys [\p{Ll}\p{Lo}][\p{Ll}\p{Lo}\p{N}_-]{0,62}, values
# [\p{Ll}\p{Lo}\p{N}_-]{0,63}, each at most 128 UTF-8 bytes, and no more than 64 labels.
# (\p{Ll}\p{Lo} is approximated by lower-case letters and letters without case, \p{N} by str.isnumeric.)
MAX_LABELS = 64


def _label_char(char: str, *, first: bool = False) -> bool:
    letter = char.isalpha() and not char.isupper() and not char.istitle()
    return letter if first else letter or char.isnumeric() or char in "_-"


def check_labels(labels: Mapping[str, str], holder: str) -> None:
    """INVALID_ARGUMENT for labels that break the rules; `holder` names what carries them ("A secret")."""
    if len(labels) > MAX_LABELS:
        raise invalid(f"{holder} has at most {MAX_LABELS} labels; {len(labels)} were given.")
    for key, value in labels.items():
        key_ok = 1 <= len(key) <= 63 and _label_char(key[0], first=True) and all(map(_label_char, key))
        if not key_ok or len(key.encode()) > 128:
            raise invalid(
                f"Invalid label key {key!r}: 1-63 lower-case letters, digits, underscores and hyphens, "
                "starting with a letter."
            )
        if len(value) > 63 or len(value.encode()) > 128 or not all(map(_label_char, value)):
            raise invalid(
                f"Invalid value {value!r} of label {key!r}: up to 63 lower-case letters, digits, "
                "underscores and hyphens."
            )
