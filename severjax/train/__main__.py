"""Train a model: ``python -m severjax.train --config=CONFIG.py[:arg] --workdir=DIR [--config.key=value ...]``.

The console script ``severjax-train`` is the same command. ``CONFIG.py`` is a config file
(``configs/*.py``, or one of the user's built the same way on :mod:`severjax.config`); ``--config.key=value``
overrides a value. The run resumes from ``DIR/checkpoints`` when it holds any; the summary of the run
(JSON) is printed at the end.

``--dry_run`` only loads and checks the config, data folder included, and prints one line.

Multi-host: pass ``--coordinator_address --num_processes --process_id`` (or run where the environment
describes the cluster, see :mod:`severjax.train.distributed`).

A user's mistake (an unknown key, a bad value, a missing file or data folder) ends in one line on stderr
and exit status 2; ``SEVERJAX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys

from severjax.ops import hostmem

TOOL = "train"


def main(argv: list[str] | None = None) -> None:
    """Runs the command line ``argv`` (default ``sys.argv``); exits with the command's status.

    With the process's own command line it first restarts the process once with huge pages for malloc
    (:func:`severjax.ops.hostmem.reexec_with_huge_pages`), before anything imports JAX.
    """
    if argv is None:
        hostmem.reexec_with_huge_pages()  # first: it restarts the process
    from absl import app

    from severjax import config as config_lib
    from severjax.cli import errors

    argv = list(sys.argv if argv is None else argv)
    status = errors.run(TOOL, lambda: config_lib.check_overrides(argv[1:]))
    if status:
        sys.exit(status)
    _define_flags()
    app.run(_main, argv=argv, flags_parser=_parse_flags)


def _main(argv: list[str]) -> None:
    from absl import flags, logging

    from severjax.cli import errors

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sys.exit(errors.run(TOOL, lambda: _run(FLAGS, argv[1:])))


def _run(FLAGS, extra: list[str]) -> None:
    import jax

    from severjax import config as config_lib
    from severjax.cli.errors import UsageError
    from severjax.train.distributed import initialize_distributed

    if extra:
        raise UsageError(f"unexpected arguments {extra}")
    if not (FLAGS.dry_run or FLAGS.workdir):
        raise UsageError("--workdir is required (the run's folder)")
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    config_lib.validate(config)
    if FLAGS.dry_run:
        if jax.process_index() == 0:
            print(_describe(config, FLAGS["config"]))
        return

    from severjax.train.loop import train_and_evaluate

    summary = train_and_evaluate(config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


def _describe(config, config_flag) -> str:
    """The dry run's line: which config, what it trains, on which devices, from which data."""
    import jax
    from ml_collections import config_flags

    from severjax.ops import policy

    data = "synthetic set in " if config.data.synthetic is not None else ""
    return (f"{config_flags.get_config_filename(config_flag)}: valid; {config.model.arch} / {config.model.encoder}, "
            f"global batch {config.batch_size} on {jax.device_count()} {policy.backend()} device(s), "
            f"{data}{config.data.dir}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "the run's config file, CONFIG.py[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", None, "the run's folder: checkpoints, TensorBoard, exported models")
    flags.DEFINE_bool("dry_run", False, "only load and check the config (data folder included), then exit")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, a bad flag (a value of the wrong type, a missing --config) ending in one line."""
    from absl import flags

    from severjax.cli import errors

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"severjax-{TOOL}: error: {errors.message(err)}", file=sys.stderr)
        sys.exit(errors.EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
