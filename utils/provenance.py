"""Provenance checks (docs/formats.md#provenance-checks): an input's JSON sidecar says how it was
made; a stage refuses an input made with other settings than its own, naming both values.

    check_provenance(path, "expert file", sidecar, recorded, wanted, fix)

`recorded` is the part of the sidecar that matters (None: no sidecar, or one without those
fields, accepted with a warning since the authors' files have none); `wanted` holds this run's
values under the same keys. Values compare after a JSON round trip (tuples as lists).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from utils.io import UserError

_warned: set[str] = set()


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_provenance(
    path: str | os.PathLike,
    what: str,
    sidecar: str | os.PathLike,
    recorded: dict[str, Any] | None,
    wanted: dict[str, Any],
    fix: str,
    warn_only: tuple[str, ...] = (),
) -> None:
    """UserError at the first key whose recorded value differs from this run's (a warning for
    the keys in `warn_only`); a warning (once per sidecar) when nothing is recorded."""
    known = {key: recorded[key] for key in wanted if recorded and key in recorded}
    if not known:
        key = str(Path(sidecar).absolute())
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"{what} {path} has no sidecar {Path(sidecar).name} recording how it was made "
                f"({', '.join(wanted)}): accepted unchecked",
                stacklevel=2,
            )
        return
    for key, value in known.items():
        if _plain(value) != _plain(wanted[key]):
            message = (
                f"{what} {path} was made with {key}={value!r} (its sidecar {Path(sidecar).name}), "
                f"this run has {key}={wanted[key]!r}"
            )
            if key not in warn_only:
                raise UserError(f"{message}: {fix}")
            warnings.warn(message, stacklevel=2)
