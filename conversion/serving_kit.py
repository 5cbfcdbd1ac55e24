"""TF Serving kit: what TF Serving reads beside a SavedModel's graph, written by the converter
with every SavedModel it exports (staged with it, published only with it):

    serving/<version>/assets.extra/tf_serving_warmup_requests   the warm-up requests
    models.config             --model_config_file: the model, the version verified, label "stable"
    batching_parameters.txt   --batching_parameters_file: batch sizes, timeout, threads, queue

Warm-up. TF Serving runs a graph lazily: the first request of each signature prunes and optimizes
the graph (Grappler), instantiates its functions, creates kernels and allocates buffers, so it is
many times slower than the next (benchmarks/RESULTS.md, "TF Serving warm-up and batching"). Before serving a
newly loaded version, TF Serving replays `assets.extra/tf_serving_warmup_requests` (a TFRecord of
`PredictionLog`, at most 1000 records; a failing record fails the load), so that cost is paid at
load time instead of by the first clients. The file holds one `PredictLog` per signature and
batch size of `BATCH_SIZES`: `serving_default` on shipped photos (conversion/photos: JPEG and
PNG, colour and grayscale) as encoded bytes, `pixel_values` on the same photos preprocessed by
the model's processor. Never the conversion's `--images`: a SavedModel that is deployed or shared
must not carry a user's data. With batching on, TF Serving pads every batch up to one of the
`allowed_batch_sizes`, the same sizes, so after the warm-up no request meets a batch size the
graph has not run (with `--saved-model-xla` each new size is an XLA compilation of seconds).

Why the records are encoded here. The messages are tensorflow-serving-api's, a client package the
converter needs for nothing else: it depends on the `tensorflow` distribution itself (a second
TensorFlow next to tensorflow-cpu or a nightly: docs/serving.md installs it with --no-deps) and
on grpcio. The tensor inside is TensorFlow's own `TensorProto`
(`tf.make_tensor_proto`); the three messages around it (`PredictionLog.predict_log` ->
`PredictLog.request` -> `PredictRequest{model_spec, inputs}`, and `ModelSpec`) take four lines of
the protobuf wire format, in which every field used here is length-delimited: a varint key
(field number << 3 | 2), a varint byte length, the bytes; a `map<string, TensorProto>` entry is
the message {1: key, 2: value}. The field numbers are those of tensorflow_serving/apis/
prediction_log.proto, predict.proto and model.proto. Defining the messages at run time from
descriptors would need the same numbers and more code; tests/test_serving_kit.py parses the file
with tensorflow-serving-api's own `PredictionLog` as the control, and runs each request.
"""

import os

import numpy as np

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving fails a load whose file has more (WarmupConsts::kMaxNumRecords)
MODELS_CONFIG, BATCHING_PARAMETERS = "models.config", "batching_parameters.txt"
CONFIG_FILES = (MODELS_CONFIG, BATCHING_PARAMETERS)
VERSION_LABEL = "stable"
# The batch sizes TF Serving forms (allowed_batch_sizes) and the warm-up runs: powers of two up to
# the size where R50x1's SavedModel reached its best throughput on 2 cores (benchmarks/RESULTS.md,
# "TF Serving warm-up and batching"); a batch is padded to the next size, wasting < half of it.
BATCH_SIZES = (1, 2, 4, 8)
SIGNATURE_INPUTS = {"serving_default": "image_bytes", "pixel_values": "pixel_values"}
# the folder a container mounts the output folder at (docs/serving.md's docker command)
CONTAINER_ROOT = "/models"


# -- the warm-up file ------------------------------------------------------------------------------


def _varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number, payload):
    """One length-delimited field (wire type 2): a string, bytes or an embedded message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predict_log(model_name, signature_name, inputs):
    """One serialized `tensorflow.serving.PredictionLog` whose `predict_log.request` asks
    `signature_name` of `model_name` for `inputs` ({input name: array})."""
    import tensorflow as tf

    model_spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())  # name, signature_name
    entries = b"".join(
        _field(2, _field(1, key.encode()) + _field(2, tf.make_tensor_proto(value).SerializeToString()))
        for key, value in inputs.items()
    )  # PredictRequest.inputs: map<string, TensorProto>, field 2
    request = _field(1, model_spec) + entries  # PredictRequest.model_spec is field 1
    return _field(6, _field(1, request))  # PredictionLog.predict_log (6) -> PredictLog.request (1)


def warmup_requests(processor, batch_sizes=BATCH_SIZES):
    """[(signature name, {input name: array})]: both signatures at each batch size, on the
    first photos of an even spread of the shipped ones (`processor`: the model's
    BitImageProcessor, which gives the `pixel_values` the model takes)."""
    from conversion import images

    photos = images.photo_images(max(batch_sizes))
    pixel_values = np.asarray(processor(photos.images), np.float32)
    requests = []
    for size in batch_sizes:
        requests.append(("serving_default", {"image_bytes": np.array(photos.encoded[:size], dtype=object)}))
        requests.append(("pixel_values", {"pixel_values": pixel_values[:size]}))
    return requests


def write_warmup(saved_model_dir, model_name, processor, batch_sizes=BATCH_SIZES):
    """`<saved_model_dir>/assets.extra/tf_serving_warmup_requests`; returns its path."""
    import tensorflow as tf

    records = [
        predict_log(model_name, signature, inputs) for signature, inputs in warmup_requests(processor, batch_sizes)
    ]
    if len(records) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(records)} warm-up records: TF Serving reads at most {MAX_WARMUP_RECORDS}")
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


# -- the server's configuration files ----------------------------------------------------------------


def _text(value):
    """A text-format string literal."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(value.encode(), as_utf8=True) + '"'


def models_config(name, version, label=VERSION_LABEL):
    """The text of a `tensorflow.serving.ModelServerConfig` serving `version` of `name` from
    `/models/<name>/serving`, the version labelled `label`."""
    base_path = f"{CONTAINER_ROOT}/{name}/serving"
    return f"""\
# TF Serving's model server config (text format of tensorflow.serving.ModelServerConfig), written by
# tfbit's converter with serving version {version}. Start the server on it from this folder (docs/serving.md):
#   docker run -p 8500:8500 -p 8501:8501 -v "$PWD:{CONTAINER_ROOT}/{name}" tensorflow/serving \\
#       --model_config_file={CONTAINER_ROOT}/{name}/{MODELS_CONFIG} --allow_version_labels_for_unavailable_models=true
model_config_list {{
  config {{
    # the name in REST URLs (/v1/models/{name}...) and in gRPC's model_spec.name
    name: {_text(name)}
    # the versions folder as the server sees it: the docker command above mounts this folder at
    # {CONTAINER_ROOT}/{name}; a server started without docker needs this folder's absolute path
    base_path: {_text(base_path)}
    model_platform: "tensorflow"
    # exactly the version this conversion verified, not whichever is newest. A later conversion into
    # this folder rewrites this file with its own version: restart the server on it (a running server
    # moves a label only to a version it has loaded: list both versions first, then the new one)
    model_version_policy {{
      specific {{
        versions: {version}
      }}
    }}
    # clients can ask for the label instead of a number (REST /v1/models/{name}/labels/{label}:predict,
    # gRPC model_spec.version_label). TF Serving assigns labels before it loads the versions, so the
    # server needs --allow_version_labels_for_unavailable_models=true to start on this file
    version_labels {{
      key: {_text(label)}
      value: {version}
    }}
  }}
}}
"""


def batching_parameters():
    """The text of a `tensorflow.serving.BatchingParameters`, each value explained."""
    sizes = "".join(f"allowed_batch_sizes: {size}\n" for size in BATCH_SIZES)
    return f"""\
# TF Serving's batching parameters (text format of tensorflow.serving.BatchingParameters), written by
# tfbit's converter. Used with: --enable_batching --batching_parameters_file=THIS_FILE (docs/serving.md).
# The values come from R50x1 (bit-50's architecture) served from this kind of SavedModel on a 2-core
# CPU (benchmarks/RESULTS.md, "TF Serving warm-up and batching"): measure on your server with
# `python benchmarks/bench_serving_warmup.py --parts batches` and adapt.

# Throughput stops growing at batch {BATCH_SIZES[-1]}: R50x1 ran 14 img/s at batch 1, 19 at 8, 18 at 16 and 15
# at 32 on the idle machine (the peak at 4-8 under load), while every request of a bigger batch
# waits for the whole batch (~0.4 s at 8, ~0.9 s at 16).
max_batch_size {{ value: {BATCH_SIZES[-1]} }}

# 0: a batch starts as soon as a thread is free, with whatever has queued. Under load the threads are
# busy, so batches fill while requests wait for them anyway; on an idle server a lone request runs at
# once instead of waiting for company that batching would speed up by 1.3x at most. TF Serving's CPU
# guideline: start at 0, then try 1000-10000.
batch_timeout_micros {{ value: 0 }}

# One batch per CPU core (TF Serving's guideline for CPUs): set it to your server's core count.
num_batch_threads {{ value: 2 }}

# Batches queued beyond the running ones; a request that finds the queue full fails at once with
# UNAVAILABLE rather than waiting. 5 batches of {BATCH_SIZES[-1]} are ~2 s of R50x1's work on 2 cores, the
# longest a request queues. Raise it for offline jobs; behind a load balancer TF Serving suggests
# num_batch_threads, so that a busy server turns requests away to another one.
max_enqueued_batches {{ value: 5 }}

# Every batch is padded up to one of these sizes (wasting less than half of it), the sizes the
# warm-up requests (serving/<version>/assets.extra/tf_serving_warmup_requests) have run, so no
# request meets a batch size the graph has not run. The last one is max_batch_size, as TF Serving
# requires.
{sizes}
# The inputs have no variable-length axis to pad: encoded images are one string each, and
# pixel_values of one batch share the model's image size.
pad_variable_length_inputs: false
"""


def write_server_configs(folder, name, version):
    """`models.config` and `batching_parameters.txt` in `folder` (beside `serving/`)."""
    for file, text in ((MODELS_CONFIG, models_config(name, version)), (BATCHING_PARAMETERS, batching_parameters())):
        with open(os.path.join(folder, file), "w", encoding="utf-8") as f:
            f.write(text)


def write(staging, version, name, processor):
    """The whole kit of the SavedModel staged at `<staging>/serving/<version>`."""
    write_warmup(os.path.join(staging, "serving", str(version)), name, processor)
    write_server_configs(staging, name, version)


def files_to_publish(published, version):
    """The kit's files beside `serving/`, published only with the SavedModel they describe."""
    return list(CONFIG_FILES) if os.path.join("serving", str(version)) in published else []
