"""Fine-tuning on several machines: `tf.distribute.MultiWorkerMirroredStrategy` from TF_CONFIG.

Every worker runs the same command. Each reads its own shard of the training data (split by
example, so no worker decodes another's images), the chief writes the outputs, and the other
workers keep their backups in a folder of their own (`OUTPUT/.worker-<i>`), removed when
training ends. See docs/scaling.md.
"""

import dataclasses
import json
import os
import shutil

from tfbit.errors import ConfigError
from tfbit.models.multi_worker_fit import WORKER_JOBS, is_multi_worker, worker_count


def multi_worker_strategy():
    """The strategy of the cluster TF_CONFIG describes. Call it before anything runs a
    TensorFlow op: collectives are configured when TensorFlow's runtime starts."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "--distribute multi_worker needs TF_CONFIG in the environment of every worker, e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\' (docs/scaling.md)'
        )
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not any(cluster.get(job) for job in WORKER_JOBS):
        raise ConfigError(f'TF_CONFIG has no "cluster" with "worker" (or "chief") addresses: {raw[:200]}')
    if (
        not isinstance(task, dict)
        or task.get("type") not in WORKER_JOBS
        or not isinstance(task.get("index"), int)
        or not 0 <= task["index"] < len(cluster.get(task["type"]) or ())
    ):
        raise ConfigError(
            f"TF_CONFIG's \"task\" must name this process's job ({' or '.join(WORKER_JOBS)}) and its "
            f"index in the cluster's list: {raw[:200]}"
        )
    import tensorflow as tf

    # Gradients all-reduced in packs of 32 MB rather than one collective per variable
    options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=32 * 2**20)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's place in the cluster."""

    is_chief: bool
    name: str  # "chief", or "worker-<index>"
    count: int  # workers (chief included)

    def scratch_dir(self, output_dir):
        """Where this worker writes: the chief `output_dir`, the others a folder of their own in it."""
        return output_dir if self.is_chief else os.path.join(output_dir, f".{self.name}")


SINGLE = Worker(is_chief=True, name="chief", count=1)


def worker_of(strategy):
    """The chief is the "chief" task, or worker 0 when the cluster has none (TensorFlow's rule)."""
    count = worker_count(strategy)
    if count == 1:
        return SINGLE
    resolver = strategy.cluster_resolver
    is_chief = resolver.task_type == "chief" or ("chief" not in resolver.cluster_spec().jobs and resolver.task_id == 0)
    return Worker(is_chief, "chief" if resolver.task_type == "chief" else f"worker-{resolver.task_id}", count)


def localhost_tf_configs(count):
    """TF_CONFIG values of a `count`-worker cluster on this machine (free localhost ports), to try
    multi-worker training without a cluster: worker i runs with TF_CONFIG=configs[i]."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    cluster = {"worker": [f"localhost:{s.getsockname()[1]}" for s in sockets]}
    for s in sockets:
        s.close()
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(count)]


def take_chief_backup(chief_backup, own_backup):
    """Start a restarted worker from the chief's backup when it can see it (a shared file
    system): its own may be one save behind if it was killed while writing, and workers that
    restore different steps would run different numbers of steps."""
    if os.path.isfile(os.path.join(chief_backup, "training_metadata.json")):
        shutil.rmtree(own_backup, ignore_errors=True)
        shutil.copytree(chief_backup, own_backup)


def distribute(strategy, make_dataset, dataset, batch_size, shard):
    """`make_dataset(dataset, per_worker_batch)`, distributed: each worker's input pipeline
    gets its shard of `dataset` (by example) when `shard`, else all of it, in batches of one
    replica's share of `batch_size`. Without several workers, the plain pipeline (Keras distributes it)."""
    if not is_multi_worker(strategy):
        return make_dataset(dataset, batch_size)
    if batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(
            f"batch size {batch_size} does not split evenly across the "
            f"{strategy.num_replicas_in_sync} replicas of the cluster"
        )

    def pipeline(context):
        part = dataset.shard(context.num_input_pipelines, context.input_pipeline_id) if shard else dataset
        return make_dataset(part, context.get_per_replica_batch_size(batch_size))

    return strategy.distribute_datasets_from_function(pipeline)
