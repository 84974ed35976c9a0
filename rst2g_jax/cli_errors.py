"""How command-line entry points end on errors a user can fix: one line, no traceback.

Library code raises specific exceptions whose message names the file or case and
what was expected; entry points wrap their body in `one_line_errors()` so those
end the process with the message and a non-zero exit code. Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import importlib
import signal
import sys

from absl import flags


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exception types whose message is the whole story (imported lazily)."""
  from rst2g_jax import input_pipeline, splits  # pylint: disable=g-import-not-at-top
  from tfds_builders import base, records  # pylint: disable=g-import-not-at-top
  kinds = [base.ManualDirError, records.CaseError, input_pipeline.DataError, splits.SplitsError]
  try:
    from rst2g_jax import train  # pylint: disable=g-import-not-at-top
    kinds.append(train.TrainingError)
  except ImportError:
    pass
  for module, name in (("evaluate", "EvaluationError"), ("predict", "PredictError")):
    try:
      kinds.append(getattr(importlib.import_module(f"rst2g_jax.{module}"), name))
    except ImportError:
      pass
  return tuple(kinds)


@contextlib.contextmanager
def one_line_errors():
  """Turns user-fixable errors into `error: <message>` + exit 1, signals into 128+signum."""
  try:
    yield
  except KeyboardInterrupt:
    print("error: interrupted (SIGINT)", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)
  except Exception as e:  # pylint: disable=broad-except
    from rst2g_jax import train  # pylint: disable=g-import-not-at-top
    if isinstance(e, train.Interrupted):
      print(f"stopped: {e}", file=sys.stderr, flush=True)
      sys.exit(128 + e.signum)
    if isinstance(e, _user_errors()):
      message = " ".join(str(e).split())  # one line, whatever the message held
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.exit(1)
    raise


def parse_flags(flag_values: flags.FlagValues, argv: list[str], *, doc: str = "") -> list[str]:
  """absl flag parsing for commands that keep their flags in their own FlagValues.

  Own FlagValues let library modules that define flags for their own command lines be
  imported without a duplicate-flag clash. `--help` prints `doc` and the flags; a bad flag
  or a stray positional argument is one line on stderr and exit code 2.
  """
  if any(a in ("-h", "--help", "-?", "--helpfull") for a in argv[1:]):
    print(doc)
    print(flag_values.get_help())
    sys.exit(0)
  flags.FLAGS([argv[0]])  # absl's own flags keep their defaults
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
    sys.exit(2)
  return rest


def run_library(module: str, flag_values: flags.FlagValues):
  """Calls `<module>.run(flag_values)` inside `one_line_errors()`, absl logging at WARNING.

  Run as `python -m`, a command's file is `__main__`; its library module is imported once
  more here so that its exception classes are the ones `one_line_errors` knows.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  with one_line_errors():
    return importlib.import_module(module).run(flag_values)

