"""Turn "a Hub id or a local folder" into a local folder, with errors that say what to do.

Weights are fetched once through huggingface_hub's cache (so HF_HOME / HF_HUB_OFFLINE / tokens
behave as everywhere else); everything downstream then loads from the local folder only.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..errors import UserError

__all__ = ["HubUnavailableError", "ModelNotFoundError", "resolve_pipeline_dir", "resolve_folder"]


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model / adapter path that is neither a usable local folder nor a valid Hub id."""


class HubUnavailableError(UserError, OSError):
    """A Hub id whose files could not be fetched (offline, unknown, gated, bad revision)."""

    exit_code = 1


def _hub_error(repo_id: str, revision: Optional[str], what: str, cause: Exception) -> HubUnavailableError:
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    rev = f" (revision {revision})" if revision else ""
    return HubUnavailableError(
        f"could not fetch the {what} '{repo_id}'{rev} from the Hugging Face Hub: no weights could be fetched "
        f"[{type(cause).__name__}: {reason}]. '{repo_id}' is not a local folder either. Download it "
        f"where the Hub is reachable (e.g. `hf download {repo_id} --local-dir DIR`, after accepting the "
        f"model licence and `hf auth login` if it is gated) and pass the local folder DIR instead of the "
        f"Hub id."
    )


def _invalid_id(path: str, what: str, cause: Exception) -> FileNotFoundError:
    return ModelNotFoundError(
        f"the {what} '{path}' is neither an existing local folder nor a valid Hub id "
        f"('namespace/name'): {cause}"
    )


def _check_subfolder(local: str, subfolder: Optional[str], what: str, source: str) -> str:
    if not subfolder:
        return local
    path = os.path.join(local, subfolder)
    if not os.path.isdir(path):
        found = sorted(os.listdir(local)) if os.path.isdir(local) else []
        raise ModelNotFoundError(
            f"the {what} '{source}' has no subfolder '{subfolder}' (looked in {path}; found {found})"
        )
    return path


def resolve_pipeline_dir(path: str, revision: Optional[str] = None) -> str:
    """Local folder of a diffusers pipeline (SD3, FLUX) given as a local folder or a Hub id.

    Hub ids are fetched with diffusers' own download logic (only the files the pipeline named in
    the repo's model_index.json loads). A local folder must hold ``model_index.json``.
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelNotFoundError(
                f"'{path}' is a folder but not a diffusers pipeline (no model_index.json). Pass the folder "
                f"written by a pipeline's `save_pretrained` or `hf download <id> --local-dir`."
            )
        return path
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HFValidationError

    try:
        return str(DiffusionPipeline.download(path, revision=revision))
    except HFValidationError as e:
        raise _invalid_id(path, "model", e) from e
    except OSError as e:  # the Hub's HTTP / offline / cache errors are all OSErrors
        raise _hub_error(path, revision, "model", e) from e


def resolve_folder(
    path: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    what: str = "adapter",
    allow_patterns: Optional[Sequence[str]] = None,
) -> str:
    """Local folder ``path/subfolder`` for a local path or a Hub repo (+ subfolder inside it).

    From the Hub only ``subfolder/*`` (or ``allow_patterns``) is downloaded, not the whole repo.
    """
    if os.path.isdir(path):
        return _check_subfolder(path, subfolder, what, path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    if allow_patterns is None and subfolder:
        allow_patterns = [f"{subfolder.strip('/')}/*"]
    try:
        local = snapshot_download(path, revision=revision, allow_patterns=allow_patterns)
    except HFValidationError as e:
        raise _invalid_id(path, what, e) from e
    except OSError as e:
        raise _hub_error(path, revision, what, e) from e
    return _check_subfolder(local, subfolder, what, path)
