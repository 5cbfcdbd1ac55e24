"""The TF Serving kit (conversion/serving_kit.py) of one conversion, typed as users type it
(`python -m conversion.convert --output DIR --formats saved_model`, a fresh process):

- the warm-up file parses with tensorflow-serving-api's own `PredictionLog`, and every request
  runs against the signature it names, through `tf.saved_model.load` and as TF Serving runs it
  (a Session fed and fetched by the signature's tensor names);
- `models.config` parses as TF Serving's `ModelServerConfig` and its label names a version that
  is there; `batching_parameters.txt` parses as `BatchingParameters`, whose message
  tensorflow-serving-api does not ship (it lives in the server's session_bundle_config.proto), so
  it is declared here field for field from that file;
- docs/serving.md's REST (curl, base64 image) and gRPC commands, as typed, against a stand-in for
  TF Serving's Predict API that answers from the export: TF Serving itself (a C++ server, shipped
  as a container image) cannot run on a test machine. The docker command is excused in
  tests/test_docs.py.
"""

import base64
import functools
import io
import json
import os
import re
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image

from conversion import serving_kit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "digits"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A user's folder after `python -m conversion.convert --output saved_models/digits
    --formats saved_model`, with the digit.png of docs/serving.md's commands."""
    from conversion.digits import load_digits_split

    root = tmp_path_factory.mktemp("serving_kit")
    command = [
        sys.executable,
        "-m",
        "conversion.convert",
        "--output",
        "saved_models/digits",
        "--formats",
        "saved_model",
    ]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, _, images, labels = load_digits_split()
    Image.fromarray(images[1]).save(root / "digit.png")  # a 9 (the first, a 5, is among the 1.4 % it misreads)
    (root / "digit.txt").write_text(str(labels[1]))
    return root


@pytest.fixture(scope="module")
def loaded(export):
    """The export's SavedModel, loaded once (each load and first run costs seconds)."""
    return tf.saved_model.load(str(export / "saved_models/digits/serving/1"))


def _records(saved_model):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(saved_model, "assets.extra", "tf_serving_warmup_requests")
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def _inputs(request):
    return {name: tf.make_ndarray(tensor) for name, tensor in request.inputs.items()}


def test_warmup_records_are_prediction_logs_of_both_signatures(export):
    logs = _records(export / "saved_models/digits/serving/1")
    assert len(logs) <= 1000 and all(log.WhichOneof("log_type") == "predict_log" for log in logs)
    requests = [log.predict_log.request for log in logs]
    assert {r.model_spec.name for r in requests} == {NAME}
    for signature, input_name in serving_kit.SIGNATURE_INPUTS.items():
        sizes = [len(_inputs(r)[input_name]) for r in requests if r.model_spec.signature_name == signature]
        assert sizes == list(serving_kit.BATCH_SIZES), signature
    # real photos: JPEG and PNG (colour and grayscale), decodable, distinct
    photos = _inputs(requests[-2])["image_bytes"]
    formats = {Image.open(io.BytesIO(blob)).format for blob in photos}
    assert formats == {"JPEG", "PNG"} and len(set(photos)) == len(photos)


def test_warmup_requests_run_against_the_signatures(export, loaded):
    for log in _records(export / "saved_models/digits/serving/1"):
        request = log.predict_log.request
        inputs = _inputs(request)
        outputs = loaded.signatures[request.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        size = len(next(iter(inputs.values())))
        assert outputs["logits"].shape == (size, 10) and outputs["labels"].shape == (size, 5)
        assert all(np.isfinite(outputs[k].numpy()).all() for k in ("logits", "probabilities", "scores"))


def test_warmup_requests_run_as_tf_serving_runs_them(export):
    """TF Serving's Predict: the request's input keys are the signature_def's, fed by tensor name
    into a Session of the MetaGraph, every output fetched."""
    saved_model = str(export / "saved_models/digits/serving/1")
    logs = _records(saved_model)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        signature_defs = tf.compat.v1.saved_model.loader.load(session, ["serve"], saved_model).signature_def
        for log in logs:
            request = log.predict_log.request
            signature = signature_defs[request.model_spec.signature_name]
            assert set(request.inputs) == set(signature.inputs)
            assert all(request.inputs[k].dtype == signature.inputs[k].dtype for k in request.inputs)
            feeds = {signature.inputs[k].name: v for k, v in _inputs(request).items()}
            out = session.run({k: v.name for k, v in signature.outputs.items()}, feeds)
            assert np.isfinite(out["probabilities"]).all() and np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)


def test_warmup_record_bytes_equal_tensorflow_serving_api_serialization():
    """The hand-written wire format against the real messages, byte for byte (a tensor over 127
    bytes, so lengths take several varint bytes)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    pixels = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    for signature, inputs in (("pixel_values", {"pixel_values": pixels}), ("serving_default", {"image_bytes": [b"x"]})):
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="my model", signature_name=signature))
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        expected = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        assert serving_kit.predict_log("my model", signature, inputs) == expected.SerializeToString()


@functools.cache
def _batching_parameters_class():
    """tensorflow.serving.BatchingParameters as tensorflow/serving declares it
    (tensorflow_serving/servables/tensorflow/session_bundle_config.proto, the same in 2.20.0 and
    at 9d981c5c of 2026-07-30): field numbers, types, wrappers."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = file.message_type.add(name="BatchingParameters")
    wrapped = [
        ("max_batch_size", 1, "Int64Value"),
        ("batch_timeout_micros", 2, "Int64Value"),
        ("max_enqueued_batches", 3, "Int64Value"),
        ("num_batch_threads", 4, "Int64Value"),
        ("thread_pool_name", 5, "StringValue"),
        ("enable_large_batch_splitting", 8, "BoolValue"),
        ("max_execution_batch_size", 9, "Int64Value"),
    ]
    for name, number, wrapper in wrapped:
        message.field.add(
            name=name,
            number=number,
            label=field.LABEL_OPTIONAL,
            type=field.TYPE_MESSAGE,
            type_name=f".google.protobuf.{wrapper}",
        )
    message.field.add(name="allowed_batch_sizes", number=6, label=field.LABEL_REPEATED, type=field.TYPE_INT64)
    message.field.add(name="pad_variable_length_inputs", number=7, label=field.LABEL_OPTIONAL, type=field.TYPE_BOOL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def test_batching_parameters_parse_as_tf_serving_batching_parameters(export):
    text = (export / "saved_models/digits/batching_parameters.txt").read_text()
    params = text_format.Parse(text, _batching_parameters_class()())
    sizes = list(params.allowed_batch_sizes)
    # TF Serving's rules (batching_session.cc): increasing, the last one is max_batch_size
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value
    assert sizes == list(serving_kit.BATCH_SIZES)  # the sizes the warm-up runs
    assert params.num_batch_threads.value >= 1 and params.max_enqueued_batches.value >= 1
    assert params.HasField("batch_timeout_micros") and not params.pad_variable_length_inputs
    with pytest.raises(text_format.ParseError):  # the control: a misspelt field is refused
        text_format.Parse(text.replace("max_batch_size", "max_batch_sizes"), _batching_parameters_class()())


def _served_version(output, label):
    """The version folder `label` names in `output`'s models.config, the config itself checked."""
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((output / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == output.name and model.model_platform == "tensorflow"
    # the docker command mounts the output folder at /models/<name>
    assert model.base_path == f"/models/{output.name}/serving"
    version = model.version_labels[label]
    assert list(model.model_version_policy.specific.versions) == [version]
    return output / "serving" / str(version)


def test_models_config_parses_and_its_label_names_the_version(export):
    output = export / "saved_models/digits"
    assert _served_version(output, "stable") == output / "serving/1"
    assert (output / "serving/1/saved_model.pb").is_file()
    assert json.loads((output / "report.json").read_text())["serving_version"] == 1


def test_models_config_of_any_name_and_version():
    from tensorflow_serving.config import model_server_config_pb2

    name = 'my "bit"\\ été'
    text = serving_kit.models_config(name, 7)
    (model,) = text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config
    assert model.name == name and model.base_path == f"/models/{name}/serving"
    assert dict(model.version_labels) == {"stable": 7} and list(model.model_version_policy.specific.versions) == [7]


def test_config_files_go_with_the_saved_model_they_describe():
    assert serving_kit.files_to_publish(["digits.keras", os.path.join("serving", "3")], 3) == list(
        serving_kit.CONFIG_FILES
    )
    assert serving_kit.files_to_publish(["digits.keras"], 3) == []  # a SavedModel that failed verification


# ---- docs/serving.md's client commands, against a stand-in for TF Serving's Predict API -------------


def _block(marker):
    text = open(os.path.join(ROOT, "docs", "serving.md"), encoding="utf-8").read()
    (found,) = [body for body in re.findall(r"```\w+\n(.*?)```", text, re.S) if marker in body]
    return found


class StandIn:
    """Predict of TF Serving's REST and gRPC APIs, answered from the export's models.config (names,
    labels, versions) and its SavedModels; only what the documented commands use."""

    def __init__(self, output, loaded):
        self.output = output
        self.models = {output / "serving/1": loaded}

    def run(self, name, version, label, signature, inputs):
        assert name == self.output.name, f"no model {name!r}"
        if label:
            folder = _served_version(self.output, label)
        else:  # a version number, or the newest
            versions = [int(p.name) for p in (self.output / "serving").iterdir() if p.name.isdigit()]
            folder = self.output / "serving" / str(version or max(versions))
        if folder not in self.models:
            self.models[folder] = tf.saved_model.load(str(folder))
        outputs = self.models[folder].signatures[signature or "serving_default"](**inputs)
        return {k: v.numpy() for k, v in outputs.items()}

    def rest(self, path, body):
        """POST /v1/models/<name>[/versions/<n>|/labels/<label>]:predict, row format ("instances"),
        binary values as {"b64": ...}, a signature with a single input."""
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/(\w+))?:predict", path)
        decode = lambda v: base64.b64decode(v["b64"]) if isinstance(v, dict) and "b64" in v else v
        values = [decode(instance) for instance in body["instances"]]
        name, version, label = match.groups()
        signature = body.get("signature_name", "serving_default")
        key = serving_kit.SIGNATURE_INPUTS[signature]
        outputs = self.run(name, version, label, signature, {key: tf.constant(values)})
        text = lambda v: v.decode() if isinstance(v, bytes) else v
        rows = [{k: [text(x) for x in v[i].tolist()] for k, v in outputs.items()} for i in range(len(values))]
        return {"predictions": rows}

    def grpc_predict(self, request, context):
        from tensorflow_serving.apis import predict_pb2

        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = self.run(spec.name, version, spec.version_label, spec.signature_name, inputs)
        response = predict_pb2.PredictResponse()
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


@pytest.fixture(scope="module")
def rest_port(export, loaded):
    stand_in = StandIn(export / "saved_models/digits", loaded)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = json.dumps(stand_in.rest(self.path, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("localhost", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def grpc_port(export, loaded):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        Predict = StandIn(export / "saved_models/digits", loaded).grpc_predict

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    yield port
    server.stop(None)


def test_docs_rest_command_with_a_base64_image(export, rest_port):
    command = _block("labels/stable:predict")
    assert "localhost:8501" in command
    done = subprocess.run(
        ["bash", "-e", "-c", command.replace("localhost:8501", f"localhost:{rest_port}")],
        cwd=export,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (prediction,) = json.loads(done.stdout)["predictions"]
    assert prediction["labels"][0] == (export / "digit.txt").read_text()


def test_docs_grpc_client(export, grpc_port, monkeypatch, capsys):
    code = _block("prediction_service_pb2_grpc")
    assert "localhost:8500" in code
    monkeypatch.chdir(export)
    exec(code.replace("localhost:8500", f"localhost:{grpc_port}"), {})
    printed = capsys.readouterr().out  # the labels TensorProto, top-1 first
    assert re.search(r'string_val: "([^"]*)"', printed).group(1) == (export / "digit.txt").read_text(), printed
