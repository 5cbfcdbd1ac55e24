"""The process environment of the converter and predict CLIs, set before TensorFlow is imported.

Importing this module imports neither `tfbit` nor TensorFlow, so a CLI can call
`inference_defaults()` first; the measurements behind the choice are in `tfbit/runtime.py`.
"""

import os

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def inference_defaults():
    """oneDNN off unless the environment says otherwise (slower for BiT inference at batch 1)."""
    os.environ.setdefault(ONEDNN, "0")
