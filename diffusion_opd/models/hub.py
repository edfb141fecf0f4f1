"""Turn "a Hub id or a local folder" into a local folder, with errors that say what to do.

Weights are fetched once through huggingface_hub's cache (so HF_HOME / HF_HUB_OFFLINE / tokens
behave as everywhere else); everything downstream then loads from the local folder only.

One resolver for every LoRA a run or a script reads (teachers, ``model.student_init``, the eval
CLI's ``--lora_path``, export): :func:`resolve_adapter`. It takes

* a local folder holding the adapter files (ours ``round-N/``, ``round-N/lora``, ``round-N/ema``;
  any ``save_pretrained`` / ``save_lora_weights`` folder), or a Flow-GRPO / DiffusionNFT
  ``checkpoint-N/`` (its adapter is in ``checkpoint-N/lora/``: used when the folder itself holds none);
* a Hub repo ``owner/repo`` with an optional ``subfolder``, also written in one string
  ``owner/repo/sub/folder[@revision]`` (Flow-Factory's spelling).

From the Hub it downloads only the adapter files at the top of that folder (and of its ``lora/``),
never nested folders: ``Student/lora/*`` would also match the extra adapters a multi-adapter
``save_pretrained`` writes below it (:func:`adapter_allow_patterns`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..errors import UserError

__all__ = ["HubUnavailableError", "ModelNotFoundError", "adapter_allow_patterns", "resolve_adapter",
           "resolve_folder", "resolve_pipeline_dir", "split_hub_path"]

ADAPTER_CONFIG = "adapter_config.json"
PEER_ADAPTER_DIR = "lora"  # Flow-GRPO / DiffusionNFT checkpoint-N/lora (and our round-N/lora)


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


def split_hub_path(path: str, subfolder: Optional[str] = None,
                   revision: Optional[str] = None) -> tuple[str, Optional[str], Optional[str]]:
    """``owner/repo/sub/folder@rev`` -> ``("owner/repo", "sub/folder[/subfolder]", "rev")``; a plain
    ``owner/repo`` keeps ``subfolder`` and ``revision``. A revision given twice must agree."""
    name, at, rev = path.partition("@")
    if at:
        if not rev or (revision and revision != rev):
            raise ModelNotFoundError(f"'{path}': revision '{rev}' after '@' {'is empty' if not rev else f'but also revision {revision!r}'}")
        revision = rev
    parts = [p for p in name.strip("/").split("/") if p]
    if len(parts) > 2:
        subfolder = "/".join(parts[2:] + ([subfolder.strip("/")] if subfolder else []))
    return "/".join(parts[:2]), (subfolder.strip("/") or None) if subfolder else None, revision


def _adapter_names(weight_name: Optional[str] = None) -> tuple[str, ...]:
    from .lora import DIFFUSERS_FILES, PEFT_FILES

    return (ADAPTER_CONFIG, weight_name) if weight_name else (ADAPTER_CONFIG, *PEFT_FILES, *DIFFUSERS_FILES)


def adapter_allow_patterns(subfolder: Optional[str], weight_name: Optional[str] = None) -> list[str]:
    """The files :func:`resolve_adapter` asks the Hub for: the adapter files directly in
    ``subfolder`` and in its ``lora/`` (a peer ``checkpoint-N``), by exact name, so nothing
    nested deeper (another adapter of a multi-adapter save) is downloaded."""
    base = f"{subfolder.strip('/')}/" if subfolder else ""
    return [prefix + name for prefix in (base, f"{base}{PEER_ADAPTER_DIR}/") for name in _adapter_names(weight_name)]


def adapter_folder(folder: str, weight_name: Optional[str] = None) -> Optional[str]:
    """``folder`` when it holds LoRA weights, else its ``lora/`` when that does (a peer
    ``checkpoint-N``), else None."""
    names = _adapter_names(weight_name)[1:]
    for candidate in (folder, os.path.join(folder, PEER_ADAPTER_DIR)):
        if any(os.path.isfile(os.path.join(candidate, n)) for n in names):
            return candidate
    return None


def _download(repo_id: str, revision: Optional[str], allow_patterns, what: str, source: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except HFValidationError as e:
        raise _invalid_id(source, what, e) from e
    except OSError as e:
        raise _hub_error(repo_id, revision, what, e) from e


def resolve_adapter(path: str, *, subfolder: Optional[str] = None, revision: Optional[str] = None,
                    weight_name: Optional[str] = None, what: str = "adapter") -> str:
    """The local folder holding a LoRA's files (see the module docstring for what ``path`` may be)."""
    if os.path.isdir(path):
        base = _check_subfolder(path, subfolder, what, path)
    else:
        repo_id, subfolder, revision = split_hub_path(path, subfolder, revision)
        local = _download(repo_id, revision, adapter_allow_patterns(subfolder, weight_name), what, path)
        base = _check_subfolder(local, subfolder, what, path)
    found = adapter_folder(base, weight_name)
    if found is None:
        names = ", ".join(_adapter_names(weight_name)[1:])
        listed = sorted(os.listdir(base)) if os.path.isdir(base) else []
        raise ModelNotFoundError(
            f"the {what} '{path}'{f' (subfolder {subfolder})' if subfolder else ''} holds no LoRA weights: looked "
            f"for {names} in {base} and its {PEER_ADAPTER_DIR}/ (found {listed}). Give the folder of a LoRA "
            "(ours: <output_dir>/checkpoints/round-N; Flow-GRPO / DiffusionNFT: checkpoint-N)")
    return found


def resolve_folder(
    path: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    what: str = "adapter",
    allow_patterns: Optional[Sequence[str]] = None,
) -> str:
    """Local folder ``path/subfolder`` for a local path or a Hub repo (+ subfolder inside it; also
    ``owner/repo/sub[@rev]``): a whole folder, e.g. a full transformer teacher. LoRAs go through
    :func:`resolve_adapter`.

    From the Hub only ``subfolder/*`` (or ``allow_patterns``) is downloaded, not the whole repo.
    """
    if os.path.isdir(path):
        return _check_subfolder(path, subfolder, what, path)
    repo_id, subfolder, revision = split_hub_path(path, subfolder, revision)
    if allow_patterns is None and subfolder:
        allow_patterns = [f"{subfolder}/*"]
    local = _download(repo_id, revision, allow_patterns, what, path)
    return _check_subfolder(local, subfolder, what, path)
