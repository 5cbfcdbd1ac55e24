"""Preprocessing as transformers' BitImageProcessor does it, in twins: `processor` (NumPy/PIL)
and `tf_processor` (TF ops, for serving graphs and tf.data); `decode` (reading encoded images in
Python: the format rules, EXIF, the messages) and `tf_decode` (the same rules as TF ops);
`layer` (the Keras layer over `tf_processor`)."""

from tfbit.preprocessing.layer import BitPreprocessing
from tfbit.preprocessing.processor import BitImageProcessor

__all__ = ["BitImageProcessor", "BitPreprocessing"]
