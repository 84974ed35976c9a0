"""Writes a work directory's splits.json from MAMA-MIA's official train/test split.

  python -m tfds_builders.mama_mia.official_split --workdir=<dir> [--data_dir=] [--num_folds=5] [--seed=0]

Needs `python -m tfds_builders.build mama_mia --config=official_split` first; then train
with `--config.data.builder_config=official_split` and the same work directory.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from tfds_builders import build
from tfds_builders.mama_mia.mama_mia_dataset_builder import write_official_splits

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training work directory that receives splits.json.", required=True)
flags.DEFINE_string("data_dir", None, f"Where the dataset was built (default {build.DEFAULT_DATA_DIR}).")
flags.DEFINE_integer("num_folds", 5, "Folds made from the official training cases.", lower_bound=2)
flags.DEFINE_integer("seed", 0, "Seed of the fold assignment.")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)   # TFDS's INFO chatter
  builder = build.make_builder("mama_mia", data_dir=FLAGS.data_dir, config="official_split")
  if not builder.is_prepared():
    print(f"official_split: error: no mama_mia/official_split build in {builder.data_dir_root}; run "
          f"`python -m tfds_builders.build mama_mia --config=official_split` first", file=sys.stderr)
    sys.exit(1)
  try:
    path = write_official_splits(builder, FLAGS.workdir, num_folds=FLAGS.num_folds, seed=FLAGS.seed)
  except ValueError as e:
    print(f"official_split: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
