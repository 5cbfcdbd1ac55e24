"""TF Hub and Kaggle Models handles of SavedModels, resolved to a local folder.

tfhub.dev now serves its models from Kaggle Models, so every handle is translated to Kaggle's
`owner/model/framework/variation/version`: `https://tfhub.dev/google/bit/m-r50x1/1` is
`google/bit/tensorFlow2/m-r50x1/1`, and the path after the model joins into one variation
(`m-r50x1/ilsvrc2012_classification` -> `m-r50x1-ilsvrc2012-classification`). A handle is looked
up, without importing either library, in the caches both write:

* kagglehub (`kagglehub/cache.py`): `$KAGGLEHUB_CACHE` (default `~/.cache/kagglehub`)
  `/models/<owner>/<model>/<framework>/<variation>/<version>/`, complete once the marker file
  `<variation>/<version>.complete` exists;
* tensorflow_hub (`tensorflow_hub/resolver.py`, `compressed_module_resolver.py`): `$TFHUB_CACHE_DIR`
  (default `<temp dir>/tfhub_modules`) `/<sha1 of the handle as typed>/`, complete once not empty.

A handle in neither is downloaded by `kagglehub.model_download`, which users install themselves
(`pip install 'tfbit[kaggle]'`); imported only then.
"""

import dataclasses
import hashlib
import os
import re
import tempfile
from pathlib import Path

from tfbit.errors import MissingFileError

_TFHUB = re.compile(r"(?:https?://)?(?:tfhub\.dev|hub\.tensorflow\.google\.cn)/(?P<path>[\w.-]+(?:/[\w.-]+)+)/?")
_KAGGLE_URL = re.compile(
    r"(?:https?://)?(?:www\.)?kaggle\.com/models/(?P<owner>[\w-]+)/(?P<model>[\w-]+)/(?:frameworks/)?"
    r"(?P<framework>[\w-]+)/(?:variations/)?(?P<variation>[\w.-]+)(?:/(?:versions/)?(?P<version>\d+))?/?(?:\?.*)?"
)
# Only TensorFlow 2 models are SavedModels: other frameworks' handles are not taken for one
_KAGGLE_HANDLE = re.compile(
    r"(?P<owner>[\w-]+)/(?P<model>[\w-]+)/(?P<framework>(?i:tensorflow2))/(?P<variation>[\w.-]+)(?:/(?P<version>\d+))?"
)
_FRAMEWORK = "tensorFlow2"  # as Kaggle's own snippets spell it, and so kagglehub caches it
DEFAULT_KAGGLEHUB_CACHE = os.path.join(Path.home(), ".cache", "kagglehub")


@dataclasses.dataclass(frozen=True)
class KaggleHandle:
    owner: str
    model: str
    framework: str
    variation: str
    version: int | None

    def __str__(self):
        return "/".join(
            [self.owner, self.model, self.framework, self.variation] + [str(self.version)] * bool(self.version)
        )

    @property
    def name(self):
        """The checkpoint's name: `bit-m-r50x1-ilsvrc2012-classification`."""
        return f"{self.model}-{self.variation}"


def kaggle_handle(text):
    """The Kaggle Models handle of a tfhub.dev handle, a Kaggle URL or handle; None for anything else."""
    match = _TFHUB.fullmatch(text)
    if match:
        *parts, version = match["path"].split("/")
        if len(parts) < 3 or not version.isdigit():
            return None
        variation = "-".join(parts[2:]).replace("_", "-")
        return KaggleHandle(parts[0], parts[1], _FRAMEWORK, variation, int(version))
    match = _KAGGLE_URL.fullmatch(text) or _KAGGLE_HANDLE.fullmatch(text)
    if match:
        version = int(match["version"]) if match["version"] else None
        return KaggleHandle(match["owner"], match["model"], match["framework"], match["variation"], version)
    return None


def is_handle(text):
    return kaggle_handle(text) is not None


def kagglehub_cache():
    return os.environ.get("KAGGLEHUB_CACHE", DEFAULT_KAGGLEHUB_CACHE)


def tfhub_cache():
    return os.environ.get("TFHUB_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "tfhub_modules")


def _kaggle_cached(handle):
    """The complete kagglehub download of `handle` (the newest when it names no version), or None.
    The framework folder is matched whatever its case: kagglehub keeps the case the user typed."""
    model = os.path.join(kagglehub_cache(), "models", handle.owner, handle.model)
    frameworks = os.listdir(model) if os.path.isdir(model) else []
    for framework in sorted(f for f in frameworks if f.lower() == handle.framework.lower()):
        variation = os.path.join(model, framework, handle.variation)
        versions = [handle.version] if handle.version else sorted(_complete_versions(variation), reverse=True)
        for version in versions:
            folder = os.path.join(variation, str(version))
            if os.path.isfile(f"{folder}.complete") and os.path.isdir(folder):
                return folder
    return None


def _complete_versions(variation):
    names = os.listdir(variation) if os.path.isdir(variation) else []
    return [int(n.removesuffix(".complete")) for n in names if re.fullmatch(r"\d+\.complete", n)]


def _tfhub_cached(text):
    folder = os.path.join(tfhub_cache(), hashlib.sha1(text.encode("utf8")).hexdigest())
    return folder if os.path.isdir(folder) and os.listdir(folder) else None


def resolve(text):
    """(local SavedModel folder, checkpoint name) of a handle: from a cache, else downloaded."""
    handle = kaggle_handle(text)
    if handle is None:
        raise MissingFileError(f"{text} is not a TF Hub or Kaggle Models handle")
    folder = _kaggle_cached(handle) or (_tfhub_cached(text) if _TFHUB.fullmatch(text) else None)
    return folder or _download(text, handle), handle.name


def _download(text, handle):
    where = f"not in the kagglehub cache ({kagglehub_cache()}) nor tensorflow_hub's ({tfhub_cache()})"
    try:
        import kagglehub
    except ImportError:
        raise MissingFileError(
            f"{text} is {where}, and downloading it needs kagglehub: pip install 'tfbit[kaggle]' "
            "(or download the SavedModel and pass its folder)"
        ) from None
    try:
        return kagglehub.model_download(str(handle))
    except Exception as e:  # kagglehub raises requests', its own and the SDK's errors alike
        raise MissingFileError(
            f"{text} is {where}, and kagglehub could not download {handle} ({type(e).__name__}: {e}): "
            "check the handle and the network, or download the SavedModel and pass its folder"
        ) from None
