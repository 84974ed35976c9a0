"""Runs the cross-validation protocol: `python -m rst2g_jax.main --config=configs/<c>.py --workdir=W`.

Errors the user can fix (missing data, bad cases, bad settings) end the run with
one line on stderr and exit code 1; SIGTERM/SIGINT save the fold first and exit
with 143/130; a rerun of the same command resumes.

The entry point keeps its flags in its own FlagValues: library modules that
define absl flags for their own command lines (e.g. `tfds_builders.build`'s
`--config`) can then be imported without a duplicate-flag clash.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rst2g_jax import cli_errors

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with "
    "--config.<section>.<field>=<value>.", flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, logs, results.",
                               flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def _parse(argv):
  return cli_errors.parse_flags(FLAGS, argv, doc=__doc__)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # progress bars and summary lines, not INFO chatter
  # Imported here so that flag errors stay fast.
  from rst2g_jax import train  # pylint: disable=g-import-not-at-top
  with cli_errors.one_line_errors():
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
