"""Original BiT release files (google-research/big_transfer), e.g. `BiT-M-R50x1.npz`.

Converted with the original code's conventions, not timm's: weight standardization with eps
1e-10, inputs scaled to [-1, 1], and evaluation by resizing the whole image to the crop size
(bilinear, no center crop).
"""

import os

import numpy as np

from tfbit.preprocessing.processor import BitImageProcessor
from tfbit.weights.checkpoint import Checkpoint
from tfbit.weights.infer import infer_config
from tfbit.weights.labels import known_labels
from tfbit.weights.readers import read_npz
from tfbit.weights.timm import default_name

WS_EPS = 1e-10  # the original StdConv2d
_T = "stage{s}_unit{u}_"
# Some re-saved files drop the "resnet/" scope, so it is optional.
_ROOT = r"(?:resnet/)?"
_UNIT = _ROOT + r"block(?P<s>\d+)/unit(?P<u>\d+)/"
TABLE = [  # kernels already HWIO; index_base 1 (unit01 -> 1)
    (_ROOT + r"root_block/standardized_conv2d/kernel", "stem_conv/kernel", None),
    (_UNIT + r"a/proj/standardized_conv2d/kernel", _T + "downsample_conv/kernel", None),
    *[
        row
        for sub, i in zip("abc", "123")
        for row in (
            (_UNIT + sub + r"/standardized_conv2d/kernel", _T + f"conv{i}/kernel", None),
            (_UNIT + sub + r"/group_norm/gamma", _T + f"norm{i}/gamma", None),
            (_UNIT + sub + r"/group_norm/beta", _T + f"norm{i}/beta", None),
        )
    ],
    (_ROOT + r"group_norm/gamma", "norm/gamma", None),
    (_ROOT + r"group_norm/beta", "norm/beta", None),
    (_ROOT + r"head/conv2d/kernel", "classifier/kernel", "conv1x1_to_linear"),
    (_ROOT + r"head/conv2d/bias", "classifier/bias", None),
]


def scope(tensors):
    """The key prefix of a file: "resnet/" in the released files, "" in some re-saved ones."""
    return "resnet/" if any(k.startswith("resnet/") for k in tensors) else ""


def original_preprocessor(crop_size=224):
    """The original evaluation preprocessing as a `BitImageProcessor`: the whole image resized
    to `crop_size` squared (bilinear, no center crop), pixels scaled to [-1, 1]."""
    return BitImageProcessor(
        size={"height": crop_size, "width": crop_size},
        do_center_crop=False,
        resample=2,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )


def read(path):
    """A `Checkpoint` of an original .npz, evaluated at 224 (the BiT-M ImageNet fine-tunes were
    evaluated at 448/480: override the size for them)."""
    path = os.fspath(path)
    tensors = read_npz(path)
    name = default_name(path)
    labels = known_labels(np.size(tensors.get(scope(tensors) + "head/conv2d/bias", ())), name)
    config = infer_config(tensors, TABLE, 1, path, labels, ws_eps=WS_EPS)
    return Checkpoint("npz", name, path, config, tensors, TABLE, 1, original_preprocessor().to_dict(), (path,))
