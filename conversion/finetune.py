"""Fine-tune a BiT model with BiT-HyperRule:

    python -m conversion.finetune SOURCE --data DATA --output DIR [--validation DATA] [--export ...]

SOURCE: anything the converter loads (hub id, checkpoint directory, timm file, .npz) or a
`.keras` file. DATA: an image folder (root/<class>/*.jpg) or a tensorflow-datasets name
("name:split", prepared under --data-dir; nothing is downloaded unless --download).
Rerunning the same command after an interruption resumes from the last backup.
"""

import os
import signal
import sys
import warnings

from conversion import cli, diskspace, environment, processes, runtime
from tfbit.errors import TfbitError
from tfbit.filetypes import check_source


def _dataset(spec, data_dir, download):
    from tfbit.finetune import from_image_folder, from_tfds

    if os.path.isdir(spec):
        return from_image_folder(spec)
    name, _, split = spec.partition(":")
    return from_tfds(name, split or "train", data_dir=data_dir, download=download)


def build_parser():
    parser = cli.parser("conversion.finetune", __doc__)
    _add_data_arguments(parser)
    _add_training_arguments(parser)
    _add_output_arguments(parser)
    return parser


def _add_data_arguments(parser):
    parser.add_argument("source")
    parser.add_argument("--data", required=True, help="training data: image folder or tfds name[:split]")
    parser.add_argument("--validation", help="validation data, same forms as --data")
    parser.add_argument("--data-dir", help="tensorflow-datasets data_dir")
    parser.add_argument("--download", action="store_true", help="let tensorflow-datasets download")
    parser.add_argument("--output", required=True, help="output directory")


def _add_training_arguments(parser):
    parser.add_argument("--batch-size", type=cli.positive_int, default=64, help="global batch size (default 64)")
    parser.add_argument(
        "--epochs",
        type=cli.positive_int,
        default=10,
        help="Keras epochs the HyperRule steps are spread over (default 10)",
    )
    parser.add_argument(
        "--steps",
        type=cli.positive_int,
        help="train this many steps instead of the HyperRule's; warm-up and decays scale with it",
    )
    parser.add_argument(
        "--schedule",
        choices=("hyperrule", "short"),
        default="hyperrule",
        help="short: for runs of a few hundred steps or fewer (peak lr 0.01 at any batch size, "
        "10%% warm-up, one decay at 80%%, small images at their own size; docs/finetuning.md 'Short runs')",
    )
    parser.add_argument("--base-lr", type=float, help="override the base learning rate (at batch 512)")
    parser.add_argument("--crop-size", type=int, help="override the training resolution")
    parser.add_argument("--resize-size", type=int, help="override the resize before the random crop")
    parser.add_argument("--mixup-alpha", type=float, help="override MixUp's alpha (0 disables)")
    parser.add_argument(
        "--no-flip", action="store_true", help="no random left-right flips (for classes that mirroring changes)"
    )
    parser.add_argument("--freeze-backbone", action="store_true", help="train the new head only")
    parser.add_argument("--mixed-precision", choices=("mixed_float16", "mixed_bfloat16"))
    parser.add_argument(
        "--distribute",
        choices=("none", "mirrored", "multi_worker"),
        default="none",
        help="mirrored: tf.distribute.MirroredStrategy over all local devices; multi_worker: "
        "MultiWorkerMirroredStrategy over the cluster in TF_CONFIG, the same command on "
        "every worker (docs/scaling.md)",
    )


def _add_output_arguments(parser):
    parser.add_argument(
        "--export",
        nargs="*",
        choices=("keras", "saved_model", "tflite"),
        help="also convert the best checkpoint (into OUTPUT/export)",
    )
    parser.add_argument(
        "--save-pretrained",
        action="store_true",
        help="also write the best checkpoint for transformers' from_pretrained (into "
        "OUTPUT/transformers: config.json, model.safetensors, preprocessor_config.json)",
    )
    cli.add_threads(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train again into an OUTPUT holding a completed run (replaced when the new run completes)",
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log lines")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        diskspace.check_writable(args.output)  # before minutes of loading and training
    except ValueError as e:
        print(f"error: --output {args.output}: {e}", file=sys.stderr)
        return 2
    try:
        check_source(args.source)  # in well under a second: before TensorFlow loads
    except TfbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    environment.configure(args.verbose, training=True)  # before anything else imports TensorFlow
    runtime.set_threads(args.threads)

    from tfbit.finetune.trainer import NonFiniteLossError, ShortScheduleWarning

    _plain_warnings(ShortScheduleWarning)
    try:
        with processes.termination_as_exit():  # SIGTERM, SIGHUP: the clean-up of a normal exit
            result = _train(args)
    except KeyboardInterrupt:
        print(f"interrupted: {_resume_hint(args.output)}", file=sys.stderr)
        return 130
    except SystemExit:
        if processes.received:
            name = signal.Signals(processes.received[0]).name
            print(f"terminated by {name}: {_resume_hint(args.output)}", file=sys.stderr)
        raise
    except (FileNotFoundError, ValueError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if reason := diskspace.out_of_space(e):
            print(f"error: {reason}; {_resume_hint(args.output)} once there is space", file=sys.stderr)
            return 2
        if args.distribute != "multi_worker" or not _is_op_error(e):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: distributed training stopped ({type(e).__name__}: {reason} ...). When every worker "
            "can run again, the same command on each resumes from the last backup",
            file=sys.stderr,
        )
        return 1
    return _report(args, result)


def _resume_hint(output):
    if os.path.isdir(os.path.join(output, "backup")):
        return "the same command resumes the run from its last backup"
    return "no epoch was backed up yet: the same command starts the run again"


def _train(args):
    from tfbit.finetune.trainer import finetune

    strategy = _strategy(args.distribute)  # before the data: collectives start with TensorFlow's runtime
    train = _dataset(args.data, args.data_dir, args.download)
    validation = _dataset(args.validation, args.data_dir, args.download) if args.validation else None
    return finetune(args.source, train, args.output, validation, _options(args, strategy))


def _options(args, strategy):
    """The `FinetuneOptions` the command line asks for, under `strategy`."""
    from tfbit.finetune.trainer import FinetuneOptions

    overrides = dict(
        base_lr=args.base_lr, crop_size=args.crop_size, resize_size=args.resize_size, mixup_alpha=args.mixup_alpha
    )
    return FinetuneOptions(
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps=args.steps,
        plan_overrides={k: v for k, v in overrides.items() if v is not None},
        freeze_backbone=args.freeze_backbone,
        strategy=strategy,
        mixed_precision=args.mixed_precision,
        random_flip=not args.no_flip,
        schedule=args.schedule,
        overwrite=args.overwrite,
    )


def _report(args, result):
    """Prints where the results are and runs the exports; the exit code."""
    if result.output_dir is None:
        print("training done; the chief writes the outputs")
        return 0
    print(f"best checkpoint: {os.path.join(args.output, 'best.keras')}")
    if args.save_pretrained:
        print(
            "transformers checkpoint:",
            result.model.save_pretrained(os.path.join(args.output, "transformers"), preprocessor=args.output),
        )
    if "validation" in result.metrics:
        print(f"validation accuracy: {result.metrics['validation']['accuracy']:.2%}")
    if args.export is not None:
        return _export(args)
    return 0


def _strategy(name):
    if name == "mirrored":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        from tfbit.finetune.workers import multi_worker_strategy

        return multi_worker_strategy()
    return None


def _is_op_error(error):
    import tensorflow as tf

    return isinstance(error, tf.errors.OpError)


def _plain_warnings(category):
    """Warnings of `category` as one "warning: ..." line on stderr, without file and line."""
    show = warnings.showwarning

    def show_plain(message, cls, filename, lineno, file=None, line=None):
        if issubclass(cls, category):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, cls, filename, lineno, file, line)

    warnings.showwarning = show_plain


def _export(args):
    """The converter CLI on best.keras, as a user would run it next: a process of its own, which
    gets the converter's inference defaults and keeps the library free of the application."""
    import subprocess

    command = [
        sys.executable,
        "-m",
        "conversion.convert",
        os.path.join(args.output, "best.keras"),
        "--output",
        os.path.join(args.output, "export"),
        "--overwrite",
        "--formats",
        *(args.export or ("keras", "saved_model", "tflite")),
    ]
    if args.validation and os.path.isdir(args.validation):
        command += ["--images", args.validation]
    print("exporting:", " ".join(command), flush=True)
    # the converter sets its own defaults (oneDNN off), so it gets the environment as exported;
    # exports need TensorFlow: a fine-tune run under JAX or torch still converts its .keras file
    env = {**environment.exported_environment(), "KERAS_BACKEND": "tensorflow"}
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
