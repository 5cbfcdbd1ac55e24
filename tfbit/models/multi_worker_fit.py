"""Keras 3 `fit` and `evaluate` under `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3.15's TensorFlow trainer fails under that strategy with more than one worker
(keras-team/keras#20585, open; tensorflow/tensorflow#72388), in two places:
- before the first step it averages the first data batch across replicas to learn its shapes,
  with `strategy.reduce` on the whole (x, y) structure, which `reduce` does not take
  ("Attempt to convert a value (PerReplica...) ... to a Tensor");
- after every step it averages the logs with `strategy.reduce("MEAN", value, axis=0)`, which
  fails on scalar metrics ("Invalid reduction dimension 0 for input with 0 dimensions").
`MultiWorkerFit`, mixed into the tfbit models, takes the shapes from the local replica's batch
and gives each log value a length-1 axis for that mean to reduce. With any other strategy or
backend it changes nothing.
"""

import keras

WORKER_JOBS = ("chief", "worker")  # the jobs MultiWorkerMirroredStrategy trains on


def worker_count(strategy):
    """The tasks `strategy` trains on: those of its cluster for a MultiWorkerMirroredStrategy
    started from a cluster spec, else 1."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec()
    return max(1, sum(spec.num_tasks(job) for job in spec.jobs if job in WORKER_JOBS))


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy over more than one task."""
    return worker_count(strategy) > 1


def _multi_worker_tf(model):
    return keras.backend.backend() == "tensorflow" and is_multi_worker(model.distribute_strategy)


class MultiWorkerFit:
    """Mixin for `keras.Model` subclasses; see the module docstring."""

    # a private Keras hook (tfbit.private_api)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is None or not _multi_worker_tf(self):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        strategy = self.distribute_strategy
        for _, _, batches in iterator:
            first = next(batches)
            break
        local = tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], first)
        return super()._maybe_symbolic_build(data_batch=local)

    def train_step(self, *args, **kwargs):
        return self._reducible(super().train_step(*args, **kwargs))

    def test_step(self, *args, **kwargs):
        return self._reducible(super().test_step(*args, **kwargs))

    def _reducible(self, logs):
        if not _multi_worker_tf(self):
            return logs
        return {name: keras.ops.reshape(value, (1,)) for name, value in logs.items()}
