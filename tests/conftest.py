"""Shared test helpers: reference models built with transformers/timm, and the parity check."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

# Small configurations keep the behaviour of the full model (every stage, downsample, padding
# rule) at a fraction of its cost; the bit-50 default has its own full-size test.
SMALL = dict(embedding_size=16, hidden_sizes=[32, 64, 96, 128], depths=[1, 2, 1, 1], num_groups=8, num_labels=7)


def tolerance(reference):
    """The parity contract: max |delta| <= 1e-4 * max(1, max |reference|)."""
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def nhwc(array):
    array = np.asarray(array)
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def assert_parity(actual, reference, what=""):
    actual, reference = np.asarray(actual), nhwc(reference)
    if reference.ndim == 4 and reference.shape[1:3] == (1, 1) and actual.ndim == 2:
        reference = reference.reshape(actual.shape)  # HF pooler keeps 1x1 spatial dims
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != {reference.shape}"
    delta = float(np.abs(actual - reference).max())
    assert delta <= tolerance(reference), f"{what}: max |delta| {delta:.3g} > {tolerance(reference):.3g}"
    return delta / max(1.0, float(np.abs(reference).max()))  # in units of the contract's scale


def perturb_(module, seed=0):
    """Random-init models have GroupNorm gamma=1, beta=0: perturb every 1-D parameter so the
    affine part of the norms is exercised."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


# Modules that run for minutes (fresh installs, full-size R50x1, multi-process training) start
# first, so that with several workers (make test: pytest-xdist) none of them is left for last.
SLOW_FIRST = (
    "test_plain_install",
    "test_readme",
    "test_realistic_r50",
    "test_multi_worker",
    "test_user_model",
    "test_finetune",
    "test_finetune_cli",
    "test_backbone_export",
    "test_batch_predict",
    "test_convert",
    "test_docs",
    "test_task_library",
    "test_savedmodel",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        module = item.module.__name__ if item.module else ""
        return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept


def _missing_dependency_fails(report):
    """`pytest.importorskip` of a test dependency (torch, timm, Beam, ...) fails the run instead
    of skipping it silently: `make test` installs every one, so a skip means a broken install.
    TFBIT_ALLOW_MISSING=1 lets a partial environment run the rest."""
    if report.skipped and "could not import" in str(report.longrepr) and not os.environ.get("TFBIT_ALLOW_MISSING"):
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr} (a test dependency is missing: pip install -e '.[test]')"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _missing_dependency_fails(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _missing_dependency_fails(outcome.get_result())


@pytest.fixture(scope="session")
def torch_module():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.fixture
def hf_checkpoint(tmp_path, torch_module):
    """Factory: (transformers class name, config kwargs) -> (checkpoint dir, eval-mode HF model)."""
    import transformers

    def make(class_name="BitForImageClassification", seed=0, subdir="hf", **config):
        torch_module.manual_seed(seed)
        model = getattr(transformers, class_name)(transformers.BitConfig(**config))
        perturb_(model, seed)
        path = tmp_path / subdir
        model.save_pretrained(path)
        return path, model

    return make


def run_torch(model, x_nhwc, **kwargs):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))), **kwargs)


def load_source(source, **kwargs):
    """`tfbit.load_model` as one record: the model and what was read."""
    import types

    import tfbit

    model, checkpoint = tfbit.load_model(source, **kwargs)
    return types.SimpleNamespace(
        model=model,
        checkpoint=checkpoint,
        config=model.config,
        format=checkpoint.format,
        name=checkpoint.name,
        preprocessor=checkpoint.preprocessor,
        path=checkpoint.path,
    )


def random_images(n, h, w, c=3, seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, c)).astype("float32")


def run_convert(*args, env=None, timeout=900):
    """The converter as a user starts it, offline: TensorFlow's log level is its own default, not
    the suite's; `env` adds to the environment."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | {"HF_HUB_OFFLINE": "1"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "conversion.convert", *map(str, args)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
