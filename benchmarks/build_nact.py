"""Build throughput of the Breast-MRI-NACT-Pilot builder (exams/s) on the real sample exam.

Copies the sample `--copies` times into a temporary manual_dir (each copy re-labelled as
another visit so that case ids stay unique) and times `download_and_prepare`, split into
scanning the headers and the whole build.

  python -m benchmarks.build_nact [--sample_dir=../shared/data/nact_pilot_sample] [--copies=3]
"""
import pathlib
import shutil
import tempfile
import time

from absl import app, flags
import pydicom
import tensorflow_datasets as tfds

from tfds_builders import reader
from tfds_builders.breast_mri_nact_pilot import Builder

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SAMPLE = flags.DEFINE_string("sample_dir", str(_ROOT.parent / "shared" / "data" / "nact_pilot_sample"),
                              "folder holding the sample exam")
_COPIES = flags.DEFINE_integer("copies", 3, "copies of the exam to build (distinct visits)")


def _copy_as_visit(src: pathlib.Path, dst: pathlib.Path, visit: int) -> None:
  """The exam under new Study/Series/SOP UIDs and time point T<visit>, so it is a separate exam."""
  uid_map = {}
  new = lambda uid: uid_map.setdefault(uid, pydicom.uid.generate_uid())
  for path in src.rglob("*.dcm"):
    ds = pydicom.dcmread(path)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
      setattr(ds, keyword, new(getattr(ds, keyword)))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ClinicalTrialTimePointID = f"T{visit}"
    out = dst / path.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)


def main(argv):
  del argv
  sample = pathlib.Path(_SAMPLE.value)
  with tempfile.TemporaryDirectory() as tmp:
    manual = pathlib.Path(tmp) / "manual"
    shutil.copytree(sample, manual / "visit1")
    for visit in range(2, _COPIES.value + 1):
      _copy_as_visit(sample, manual / f"visit{visit}", visit)
    start = time.perf_counter()
    scan = reader.scan_dicom(manual)
    scan_s = time.perf_counter() - start
    start = time.perf_counter()
    builder = Builder(data_dir=str(pathlib.Path(tmp) / "data"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    build_s = time.perf_counter() - start
    exams = len(builder.info.metadata["cases"])
    files = sum(len(s.headers) for s in scan.series)
    print(f"header scan: {files} files in {scan_s:.2f} s ({files / scan_s:.0f} files/s)")
    print(f"build: {exams} exams in {build_s:.2f} s = {exams / build_s:.3f} exams/s "
          f"({build_s / exams:.2f} s/exam, grid {builder.grid_shape}, incl. scan)")


if __name__ == "__main__":
  app.run(main)
