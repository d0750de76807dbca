"""Hugging Face hub access for ``model.source=hub``: one line instead of retries and tracebacks.

:func:`check_hub_access` runs before ``from_pretrained``: a checkpoint in the local cache (or a local
folder) passes; otherwise, offline (``HF_HUB_OFFLINE=1``) fails at once, and online one quick
metadata request (no retries) tells an unreachable hub or an unknown repository apart.
:func:`hub_error` turns what ``from_pretrained`` raises (gated repository, connection lost, missing
files) into a :class:`ModelUnavailableError` with the same hints.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ModelUnavailableError", "check_hub_access", "hub_error"]

PROBE_TIMEOUT_S = 10.0


class ModelUnavailableError(RuntimeError):
    """The model's checkpoint cannot be fetched or read (one line, with what to do)."""


def _hints(hub_id: str) -> str:
    return (
        "gated models (LLaMA-3 is) need their licence accepted on the hub page and `hf auth login` "
        f"(or HF_TOKEN); offline, download it elsewhere (`hf download {hub_id} --local-dir DIR`) and "
        "set model.hub_id=/path/to/folder"
    )


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cached(hub_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except Exception:  # an id the cache cannot hold (e.g. a malformed one): let the loader say
        return False
    return isinstance(found, str)


def check_hub_access(name: str, hub_id: str, revision: str | None = None) -> None:
    """Raise :class:`ModelUnavailableError` when ``hub_id`` can surely not be loaded: neither a
    local folder nor cached, and the machine is offline, the hub unreachable, or the repository
    unknown. Any other answer (rate limit, server error...) is left to ``from_pretrained``."""
    if Path(hub_id).expanduser().is_dir() or _cached(hub_id, revision):
        return
    where = f"model {name!r}: could not fetch {hub_id}" + (f"@{revision}" if revision else "")
    if _offline():
        raise ModelUnavailableError(
            f"{where}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; " + _hints(hub_id)
        )
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        return
    try:
        model_info(hub_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelUnavailableError(
            f"{where}: the repository is gated ({_reason(exc)}); " + _hints(hub_id)
        ) from None
    except RepositoryNotFoundError as exc:
        raise ModelUnavailableError(
            f"{where}: no such repository, or it is private or gated ({_reason(exc)}); " + _hints(hub_id)
        ) from None
    except HfHubHTTPError:  # the hub answered (rate limit, server error...): let the download try
        return
    except Exception as exc:  # no answer at all: no network, DNS, proxy, timeout
        raise ModelUnavailableError(
            f"{where}: the Hugging Face hub cannot be reached and it is not in the local cache "
            f"(offline? {_reason(exc)}); " + _hints(hub_id)
        ) from None


def hub_error(name: str, hub_id: str, exc: BaseException) -> ModelUnavailableError:
    """What ``from_pretrained``'s ``OSError`` (gated, connection, missing file) means, in one line."""
    if Path(hub_id).expanduser().is_dir():
        return ModelUnavailableError(
            f"model {name!r}: cannot load the folder model.hub_id={hub_id} ({_reason(exc)}); it must hold "
            "a save_pretrained checkpoint (config.json, weights, tokenizer files)"
        )
    return ModelUnavailableError(
        f"model {name!r}: could not fetch {hub_id} (offline, or a gated or unknown repository: "
        f"{_reason(exc)}); " + _hints(hub_id)
    )
