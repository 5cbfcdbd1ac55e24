"""Downloads from the Hugging Face hub through `huggingface_hub`, which honours its cache
(`HF_HUB_CACHE`, `HF_HOME`) and `HF_HUB_OFFLINE=1`. Only config and weight files are fetched."""

import re

from tfbit.errors import MissingFileError

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_repo_id(text):
    return bool(_REPO_ID.fullmatch(text)) and not text.startswith(".")


def _offline():
    # A submodule: `import huggingface_hub` alone does not load it on every version.
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def snapshot(repo_id):
    """Local directory of a transformers checkpoint repo: its JSON files and weights
    (safetensors preferred over the pickle-based pytorch_model.bin)."""
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError  # also where huggingface_hub 0.24 has it

    try:
        files = None if _offline() else set(huggingface_hub.list_repo_files(repo_id))
        patterns = ["*.json"]
        if files is None or any(f.endswith(".safetensors") for f in files):
            patterns.append("*.safetensors")
        if files is None or not any(f.endswith(".safetensors") for f in files):
            patterns.append("pytorch_model.bin")
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise MissingFileError(
            f"{repo_id} is neither a local directory nor a reachable Hugging Face hub repo ({type(e).__name__}: {e})"
        ) from None


def download(repo_id, filenames):
    """Path of the first of `filenames` the repo has; MissingFileError listing each failure."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError

    errors = []
    for filename in filenames:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename)
        except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            errors.append(f"{filename}: {type(e).__name__}: {e}")
    raise MissingFileError(
        f"{repo_id}: none of {', '.join(filenames)} could be fetched from the "
        "Hugging Face hub:\n  " + "\n  ".join(errors)
    )
