"""Multi-worker fine-tuning on one host: the step time of `python -m conversion.finetune` on one worker
(every core) against two workers (a core each, MultiWorkerMirroredStrategy over gRPC on
localhost), same global batch and data, in one run. It measures what synchronizing the replicas
costs, not a speed-up: two workers on the cores one worker already uses cannot be faster.

    python benchmarks/bench_multi_worker.py [--model r50x1] [--steps 16] [--batch-size 16] [--size 128]

The step time is the median of the second epoch's steps in metrics.json (the first epoch
includes tracing).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

MODELS = {
    "r50x1": {},
    "small": dict(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], num_groups=8),
}


def _photo_classes(root):
    """The shipped photos as a two-class folder (classes do not matter for speed)."""
    from PIL import Image

    photos = sorted(os.listdir(os.path.join(common.ROOT, "conversion", "photos")))
    photos = [p for p in photos if p.lower().endswith((".jpg", ".jpeg", ".png"))]
    for i, name in enumerate(photos):
        folder = os.path.join(root, "ab"[i % 2])
        os.makedirs(folder, exist_ok=True)
        Image.open(os.path.join(common.ROOT, "conversion", "photos", name)).convert("RGB").save(
            os.path.join(folder, os.path.splitext(name)[0] + ".png")
        )
    return root


def _run(workers, command, workdir, threads):
    env = {**os.environ, **common.BASE_ENV}
    envs = [env]
    if workers > 1:
        from tfbit.finetune.workers import localhost_tf_configs

        envs = [{**env, "TF_CONFIG": config} for config in localhost_tf_configs(workers)]
    extra = ["--distribute", "multi_worker"] if workers > 1 else []
    output = os.path.join(workdir, f"run{workers}")
    logs = [os.path.join(workdir, f"log{workers}-{i}") for i in range(workers)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [*command, "--output", output, "--threads", str(threads), *extra],
            env=e,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )
        for e, log in zip(envs, logs)
    ]
    codes = [p.wait() for p in processes]
    wall = time.perf_counter() - started
    text = open(logs[0]).read()
    if any(codes):
        raise RuntimeError(f"{workers} worker(s) exited with {codes}:\n{text[-3000:]}")
    with open(os.path.join(output, "metrics.json")) as f:
        metrics = json.load(f)
    second_epoch = metrics["steps"]["seconds"][metrics["steps_per_epoch"] :]
    return common.median(second_epoch), wall, metrics["num_replicas"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="r50x1")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    print(
        common.header(
            "bench_multi_worker.py",
            f"model {args.model}, {args.size} px, global batch {args.batch_size}, {args.steps} steps in 2 epochs",
        )
    )
    with tempfile.TemporaryDirectory() as workdir:
        source = os.path.join(workdir, "model.keras")
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, tfbit; tfbit.BitForImageClassification("
                f"tfbit.BitConfig(**{MODELS[args.model]!r})).save(sys.argv[1])",
                source,
            ],
            env={**os.environ, **common.BASE_ENV},
            check=True,
        )
        data = _photo_classes(os.path.join(workdir, "photos"))
        command = [
            sys.executable,
            "-m",
            "conversion.finetune",
            source,
            "--data",
            data,
            "--steps",
            str(args.steps),
            "--epochs",
            "2",
            "--batch-size",
            str(args.batch_size),
            "--crop-size",
            str(args.size),
            "--resize-size",
            str(args.size + args.size // 8),
        ]
        one = _run(1, command, workdir, threads=common.THREADS)
        two = _run(2, command, workdir, threads=common.THREADS // 2)
    rows = [
        ["1 worker", f"{common.THREADS} threads", one[2], f"{one[0] * 1000:.0f}", f"{one[1]:.0f}"],
        ["2 workers", f"{common.THREADS // 2} thread each", two[2], f"{two[0] * 1000:.0f}", f"{two[1]:.0f}"],
    ]
    print(common.table(["run", "threads", "replicas", "step ms (epoch 2)", "wall s"], rows))
    print(f"2 workers / 1 worker step time: {two[0] / one[0]:.2f}x")


if __name__ == "__main__":
    main()
