"""Synthetic breast DCE-MRI exams: anatomy, Tofts kinetics, MR signal, acquisition.

The phantom exists so that the project runs end to end with no download while the
model's parts still matter: tumors differ from their confounders (vessels, heart,
benign foci, background parenchymal enhancement) by kinetics and shape, not by one
intensity threshold. Everything is NumPy/SciPy and deterministic by seed.

Geometry is axial, axis order (z, y, x); y runs posterior (row 0 is anterior, the
breasts) and the anatomy is laid out in coordinates normalised to the field of
view, so a coarse grid holds a scaled-down body while tumor sizes stay in mm.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

# Parker et al. 2006 population AIF (whole blood, mM; times in minutes).
_PARKER = dict(a1=0.809, a2=0.330, t1=0.17046, t2=0.365, s1=0.0563, s2=0.132,
               alpha=1.050, beta=0.1685, s=38.078, tau=0.483)
HEMATOCRIT = 0.42
RELAXIVITY = 4.5          # r1 of the agent, 1/(mM s) (gadolinium chelate at 1.5 T)

# Tissue classes painted into the label volume; benign foci get ids FOCUS, FOCUS+1, ...
AIR, FAT, FGT, SKIN, MUSCLE, LUNG, BLOOD, TUMOR, NECROSIS, FOCUS = range(10)

# Relaxation and proton density per class: (T10 in ms, M0 relative to FGT).
# Fat has a low effective M0 because the sequence is fat-suppressed.
_RELAXATION = {
    AIR: (1000.0, 0.0), FAT: (300.0, 0.12), FGT: (1300.0, 1.0), SKIN: (900.0, 0.7),
    MUSCLE: (1000.0, 0.75), LUNG: (1200.0, 0.06), BLOOD: (1550.0, 0.95),
    TUMOR: (1250.0, 0.95), NECROSIS: (1900.0, 0.9), FOCUS: (1200.0, 0.95),
}


# --- kinetics --------------------------------------------------------------------
def parker_aif(times_s: np.ndarray) -> np.ndarray:
  """Whole-blood concentration (mM) of the Parker population AIF; zero before injection."""
  p = _PARKER
  t = np.asarray(times_s, np.float64) / 60.0
  gauss = lambda a, mu, sd: a / (sd * math.sqrt(2 * math.pi)) * np.exp(-(t - mu) ** 2 / (2 * sd * sd))
  with np.errstate(over="ignore"):
    sigmoid = p["alpha"] * np.exp(-p["beta"] * t) / (1.0 + np.exp(-p["s"] * (t - p["tau"])))
  cb = gauss(p["a1"], p["t1"], p["s1"]) + gauss(p["a2"], p["t2"], p["s2"]) + sigmoid
  return np.where(t > 0, cb, 0.0)


def tofts_concentration(times_s, ktrans, kep, vp) -> np.ndarray:
  """Extended-Tofts tissue concentration (mM) at `times_s` for scalar kinetics.

  C(t) = vp Cp(t) + Ktrans * integral Cp(u) exp(-kep (t - u)) du, with Ktrans and
  kep in 1/min and Cp the plasma concentration (blood AIF / (1 - Hct)).
  """
  times_s = np.asarray(times_s, np.float64)
  dt = 1.0
  grid = np.arange(0.0, max(float(times_s.max()), 0.0) + 2 * dt, dt)
  cp = parker_aif(grid) / (1 - HEMATOCRIT)
  kernel = np.exp(-kep * grid / 60.0)
  conv = np.convolve(cp, kernel)[: grid.size] * (dt / 60.0)
  at = lambda y: np.interp(times_s, grid, y, left=0.0)
  return vp * at(cp) + ktrans * at(conv)


def spgr_signal(r1: np.ndarray, m0, flip_deg: float, tr_ms: float) -> np.ndarray:
  """Spoiled gradient-echo steady-state signal for longitudinal relaxation rate r1 (1/s)."""
  a = math.radians(flip_deg)
  e1 = np.exp(-(tr_ms / 1000.0) * r1)
  return m0 * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1)


# --- exam table ------------------------------------------------------------------
def exam_table(spec) -> list[tuple[int, int]]:
  """(patient, visit) of every exam in index order; some patients have two visits.

  `spec` (here and below) is a synthetic_dce builder config (`SyntheticConfig`);
  the phantom reads its fields by name.
  """
  rng = np.random.default_rng([spec.seed, 0])
  table: list[tuple[int, int]] = []
  patient = 0
  while len(table) < spec.num_cases:
    visits = 2 if rng.random() < spec.two_visit_fraction else 1
    table.extend((patient, v) for v in range(1, visits + 1))
    patient += 1
  return table[: spec.num_cases]


def patient_id(spec, patient: int) -> str:
  return f"{spec.centre}-P{patient:04d}"


def case_id(spec, patient: int, visit: int) -> str:
  return f"{patient_id(spec, patient)}-V{visit}"


def strata_thresholds_mm(spec) -> tuple[float, float]:
  """Equivalent-diameter limits of the tumor-volume tertiles of the config's size range.

  Main-lesion diameters are drawn log-uniformly over `tumor_mm`, so these fixed
  limits (geometric thirds of the range) split the exams roughly evenly.
  """
  lo, hi = spec.tumor_mm
  return lo * (hi / lo) ** (1 / 3), lo * (hi / lo) ** (2 / 3)


def equivalent_diameter_mm(mask: np.ndarray, spacing) -> float:
  """Diameter of the sphere with the mask's volume."""
  volume = float(mask.sum()) * float(np.prod(spacing))
  return (6 * volume / math.pi) ** (1 / 3)


# --- geometry helpers --------------------------------------------------------------
class _Grid:
  """Voxel-centre coordinates in mm and normalised to the field of view."""

  def __init__(self, shape, spacing):
    self.shape = tuple(shape)
    self.spacing = np.asarray(spacing, np.float64)
    self.half_fov = self.spacing * np.asarray(shape) / 2
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    self.z, self.y, self.x = np.meshgrid(*axes, indexing="ij", sparse=True)
    self.w, self.v, self.u = (a / h for a, h in zip((self.z, self.y, self.x), self.half_fov))

  def smooth_noise(self, rng, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length `sigma_mm`.

    Long correlations are filtered on a grid coarser by up to sigma/2 voxels and
    interpolated back: the same field statistics at a fraction of the cost.
    """
    sigma = np.maximum(sigma_mm / self.spacing, 0.5)
    factor = np.maximum(np.floor(sigma / 2), 1).astype(int)
    coarse = -(-np.asarray(self.shape) // factor) + 1
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(coarse)).astype(np.float32), sigma / factor)
    if np.any(factor > 1):
      field = ndimage.zoom(field, factor, order=1, grid_mode=False)
    field = field[tuple(slice(0, n) for n in self.shape)]
    return (field - field.mean()) / (field.std() + 1e-8)

  def to_index(self, point_mm) -> np.ndarray:
    return np.asarray(point_mm) / self.spacing + (np.asarray(self.shape) - 1) / 2


def _box(grid: _Grid, centre_mm, half_mm: float):
  """Slices of the voxels within `half_mm` of `centre_mm`, and their offsets (mm)."""
  c = grid.to_index(centre_mm)
  h = half_mm / grid.spacing
  lo = np.maximum(np.floor(c - h).astype(int), 0)
  hi = np.minimum(np.ceil(c + h).astype(int) + 1, grid.shape)
  sl = tuple(slice(a, b) for a, b in zip(lo, hi))
  offs = [(np.arange(a, b) - (n - 1) / 2) * s - cm
          for a, b, n, s, cm in zip(lo, hi, grid.shape, grid.spacing, centre_mm)]
  return sl, np.meshgrid(*offs, indexing="ij")


def _radial_wobble(rng, directions: np.ndarray, amplitude: float, waves: int = 6) -> np.ndarray:
  """Smooth random function on the unit sphere (sum of plane waves), in [-amp, amp]-ish."""
  freqs = rng.normal(0.0, 1.3, size=(waves, 3))
  phases = rng.uniform(0, 2 * np.pi, size=waves)
  total = sum(np.cos(np.pi * np.tensordot(directions, f, axes=([0], [0])) + ph)
              for f, ph in zip(freqs, phases))
  return amplitude * total / math.sqrt(waves / 2)


@dataclasses.dataclass
class _Blob:
  """An irregular ellipsoid: centre (mm), radii (mm), rotation, surface wobble."""
  centre: np.ndarray
  radii: np.ndarray
  rotation: np.ndarray
  irregularity: float
  wobble_seed: int

  def evaluate(self, grid: _Grid, margin: float = 1.0):
    """Over the blob's bounding box: (slices, inside, normalised radius q, offsets [3, ...] mm)."""
    reach = float(self.radii.max()) * (1 + 2.5 * self.irregularity) * margin + grid.spacing.max()
    sl, (dz, dy, dx) = _box(grid, self.centre, reach)
    p = np.stack([dz, dy, dx])                                        # [3, ...] mm
    local = np.tensordot(self.rotation.T, p, axes=1)
    q = np.sqrt(sum((local[i] / self.radii[i]) ** 2 for i in range(3)))
    norm = np.sqrt((local ** 2).sum(0)) + 1e-6
    wobble = _radial_wobble(np.random.default_rng(self.wobble_seed), local / norm, self.irregularity)
    return sl, q <= 1.0 + wobble, q, p


def _paint(labels: np.ndarray, sl, inside: np.ndarray, value: int) -> None:
  labels[sl][inside] = value


# --- anatomy -----------------------------------------------------------------------
@dataclasses.dataclass
class _Anatomy:
  labels: np.ndarray           # int16 class ids
  breasts: np.ndarray          # bool, the two breasts (for placing lesions)
  ktrans_mod: np.ndarray       # float32 spatial modulation of Ktrans (BPE patches, tumor rim)
  mask: np.ndarray             # uint8 tumor annotation
  focus_kinetics: list         # (ktrans, kep) per benign focus id FOCUS + i


def _body(grid: _Grid, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Labels of torso and breasts, the breasts inside the skin, and each voxel's depth (mm)."""
  u, v, w = grid.u, grid.v, grid.w
  labels = np.zeros(grid.shape, np.int16)
  cw0 = rng.uniform(0.05, 0.18)
  front = cw0 + 0.14 * u ** 2                                  # anterior torso surface
  torso = (v >= front) & (np.abs(u) <= 0.97)
  labels[np.broadcast_to(torso, grid.shape)] = FAT
  depth = v - front
  muscle = torso & (depth >= 0.03) & (depth < 0.11)
  labels[np.broadcast_to(muscle, grid.shape)] = MUSCLE
  thorax = torso & (depth >= 0.11) & (np.abs(u) < 0.85)
  labels[np.broadcast_to(thorax, grid.shape)] = LUNG
  side = torso & (np.abs(u) >= 0.85) & (depth >= 0.11)
  labels[np.broadcast_to(side, grid.shape)] = MUSCLE
  # Heart and descending aorta in the thorax; internal mammary vessels behind the chest wall.
  hu, hv = rng.uniform(-0.02, 0.12), cw0 + rng.uniform(0.42, 0.5)
  heart = (((u - hu) / 0.30) ** 2 + ((v - hv) / 0.27) ** 2 + (w / 1.4) ** 2 <= 1) & thorax
  labels[np.broadcast_to(heart, grid.shape)] = BLOOD
  aorta = ((u - 0.18) / 0.07) ** 2 + ((v - hv - 0.33) / 0.07) ** 2 <= 1
  labels[np.broadcast_to(aorta & torso, grid.shape)] = BLOOD
  hy, hx = grid.half_fov[1:]
  for s in (-1, 1):                                            # internal mammary vessels, 1.6 mm
    im = ((u - s * 0.12) * hx) ** 2 + ((v - front - 0.13) * hy) ** 2 <= 1.6 ** 2
    labels[np.broadcast_to(im & torso, grid.shape)] = BLOOD
  # Two breasts hanging anteriorly, their outline wobbled by a smooth field.
  shape_noise = grid.smooth_noise(rng, sigma_mm=0.25 * grid.half_fov[2])
  breasts = np.zeros(grid.shape, bool)
  for s in (-1, 1):
    uc = s * rng.uniform(0.40, 0.50)
    ru, rw = rng.uniform(0.32, 0.42), rng.uniform(1.0, 1.4)
    rv = min(rng.uniform(0.50, 0.75), 0.93 + cw0)
    r = ((u - uc) / ru) ** 2 + ((v - front) / rv) ** 2 + (w / rw) ** 2
    breasts |= (r * (1 + 0.08 * shape_noise) <= 1) & (v < front)
  labels[breasts] = FAT
  # Skin: the outer 1.5-2 mm of the body.
  body = labels != AIR
  skin_mm = rng.uniform(1.5, 2.2)
  depth_mm = ndimage.distance_transform_edt(body, sampling=grid.spacing)
  labels[body & (depth_mm <= skin_mm)] = SKIN
  return labels, breasts & (depth_mm > skin_mm), depth_mm


def _fibroglandular(grid: _Grid, rng, labels, breasts, depth_mm) -> None:
  """Fibroglandular tissue: a thresholded smooth random field, denser centrally."""
  coarse = grid.smooth_noise(rng, sigma_mm=0.08 * grid.half_fov[2])
  fine = grid.smooth_noise(rng, sigma_mm=max(3.0, 1.5 * grid.spacing[1:].min()))
  inner = np.clip(depth_mm / (0.25 * grid.half_fov[2]), 0, 1)   # away from skin
  field = coarse + 0.5 * fine + 1.5 * inner
  density = rng.uniform(0.15, 0.55)
  values = field[breasts]
  thresh = np.quantile(values, 1 - density) if values.size else np.inf
  labels[breasts & (field > thresh) & (depth_mm > 3.0)] = FGT


def _vessels(grid: _Grid, rng, labels, breasts) -> None:
  """A few tortuous breast vessels running from the chest wall towards the nipple."""
  idx = np.argwhere(breasts)
  if idx.size == 0:
    return
  rows = idx[:, 1]
  posterior = idx[rows >= np.quantile(rows, 0.7)]      # large y: near the chest wall
  anterior = idx[rows <= np.quantile(rows, 0.4)]
  seeds = np.ones(grid.shape, bool)
  radius_at = np.zeros(grid.shape, np.float32)
  t = np.linspace(0, 1, 4 * max(grid.shape))[:, None]
  for _ in range(int(rng.integers(3, 7))):
    a, b = posterior[rng.integers(len(posterior))], anterior[rng.integers(len(anterior))]
    bend = (a + b) / 2 + rng.normal(0, 0.12, 3) * np.asarray(grid.shape)
    curve = (1 - t) ** 2 * a + 2 * t * (1 - t) * bend + t ** 2 * b
    pts = tuple(np.clip(np.round(curve).astype(int), 0, np.asarray(grid.shape) - 1).T)
    seeds[pts] = False
    radius_at[pts] = rng.uniform(0.9, 2.2)                # mm
  dist, nearest = ndimage.distance_transform_edt(seeds, sampling=grid.spacing, return_indices=True)
  labels[(dist <= radius_at[tuple(nearest)]) & breasts] = BLOOD


def _place(grid: _Grid, rng, region: np.ndarray, inner_mm: np.ndarray, need_mm: float,
           z_half_mm: float) -> np.ndarray | None:
  """A random voxel centre (mm) in `region` at least `need_mm` from its edge, slab-safe in z."""
  zmax = grid.half_fov[0] - z_half_mm - grid.spacing[0]
  ok = region & (inner_mm >= need_mm) & (np.abs(grid.z) <= max(zmax, 0.0))
  idx = np.argwhere(ok)
  if idx.size == 0:
    return None
  pick = idx[rng.integers(len(idx))]
  return (pick - (np.asarray(grid.shape) - 1) / 2) * grid.spacing


def _lesion(rng, centre, diameter_mm: float, irregularity: float, max_z_half: float) -> _Blob:
  """An irregular ellipsoid of equivalent diameter `diameter_mm`, flattened to fit the slab."""
  aspect = rng.uniform(0.7, 1.3, 3)
  aspect /= np.cbrt(aspect.prod())
  radii = diameter_mm / 2 * aspect
  rot = Rotation.random(random_state=rng).as_matrix()
  for _ in range(6):                         # squash along the lesion's most z-ward axis
    z_half = math.sqrt(float(((rot[0] * radii) ** 2).sum())) * (1 + irregularity)
    if z_half <= max_z_half:
      break
    k = max(max_z_half / z_half, 0.5)
    axis = int(np.argmax(np.abs(rot[0]) * radii))
    radii[axis] *= k
    radii[[a for a in range(3) if a != axis]] /= math.sqrt(k)
  return _Blob(np.asarray(centre, float), radii, rot, irregularity, int(rng.integers(2**31)))


def _tumor(grid: _Grid, rng_patient, rng_visit, spec, anatomy: _Anatomy, breast_depth, shrink: float):
  """Main lesion (maybe spiculated, necrotic, multifocal) painted and annotated."""
  labels, mask = anatomy.labels, anatomy.mask
  lo, hi = spec.tumor_mm
  d_first = math.exp(rng_patient.uniform(math.log(lo), math.log(hi)))   # at the first visit
  d_main = max(d_first * shrink, lo * 1.05)
  irregularity = rng_patient.uniform(0.05, 0.25)
  z_room = grid.half_fov[0] - 1.5 * grid.spacing[0]
  centre = None
  for frac in (0.6, 0.4, 0.2, 0.0):      # same place at every visit: depends on d_first only
    centre = _place(grid, rng_patient, anatomy.breasts, breast_depth, frac * d_first / 2,
                    min(d_first / 2, z_room * 0.8))
    if centre is not None:
      break
  if centre is None:
    raise ValueError("phantom: breasts too small for a tumor; use a larger field of view")
  blob = _lesion(rng_patient, centre, d_main, irregularity, z_room - abs(centre[0]))
  sl, inside, q, p = blob.evaluate(grid, margin=2.0)     # room for spicules
  spiculated = rng_patient.random() < 0.3
  n_spikes = int(rng_patient.integers(5, 13))
  spikes = [(rng_patient.normal(size=3), rng_patient.uniform(0.4, 1.0), rng_patient.uniform(0.7, 1.5))
            for _ in range(n_spikes)]
  if spiculated:
    r_mean = float(blob.radii.mean())
    dist = np.sqrt((p ** 2).sum(0))
    for direction, length, width in spikes:
      direction = direction / np.linalg.norm(direction)
      along = np.tensordot(direction, p, axes=1)
      across = np.sqrt(np.maximum(dist ** 2 - along ** 2, 0))
      reach = r_mean * (1 + length)
      taper = width * np.clip(1 - along / reach, 0, 1) + 0.25 * grid.spacing.min()
      inside |= (along > 0) & (along < reach) & (across <= taper)
  # Rim enhancement: Ktrans rises from 0.75x at the centre to ~1.25x at the rim.
  het = 0.75 + 0.5 * np.clip(q, 0, 1.3) ** 2
  anatomy.ktrans_mod[sl][inside] = het[inside]
  _paint(labels, sl, inside, TUMOR)
  mask[sl][inside] = 1
  if d_main >= 2.2 * lo and rng_patient.random() < 0.4:        # necrotic core, inside the mask
    core = dataclasses.replace(blob, radii=blob.radii * rng_visit.uniform(0.3, 0.55), irregularity=0.05)
    csl, cin, _, _ = core.evaluate(grid)
    _paint(labels, csl, cin & (mask[csl] == 1), NECROSIS)
  if rng_patient.random() < 0.2:                                # multifocal: satellites
    for _ in range(int(rng_patient.integers(1, 3))):
      d_lo = max(lo * 0.8, 2 * grid.spacing[1:].max())
      d_sat = rng_patient.uniform(d_lo, max(d_lo, 0.5 * d_main))
      direction = rng_patient.normal(size=3)
      direction /= np.linalg.norm(direction)
      c = centre + direction * (d_main / 2 + rng_patient.uniform(3, 12) + d_sat / 2)
      ci = np.round(grid.to_index(c)).astype(int)
      if np.any(ci < 0) or np.any(ci >= grid.shape) or not anatomy.breasts[tuple(ci)]:
        continue
      if abs(c[0]) + d_sat / 2 > z_room:
        continue
      sat = _lesion(rng_patient, c, d_sat, 0.1, z_room - abs(c[0]))
      ssl, sin, _, _ = sat.evaluate(grid)
      anatomy.ktrans_mod[ssl][sin] = 1.0
      _paint(labels, ssl, sin, TUMOR)
      mask[ssl][sin] = 1


def _foci(grid: _Grid, rng, anatomy: _Anatomy, breast_depth) -> None:
  """Benign enhancing foci (not in the mask): round, small, persistent/plateau kinetics."""
  for i in range(int(rng.poisson(2.0))):
    d = rng.uniform(max(4.0, 2.5 * grid.spacing[1:].max()), 9.0)
    c = _place(grid, rng, anatomy.breasts & (anatomy.mask == 0), breast_depth, d / 2, d / 2)
    if c is None:
      return
    blob = _lesion(rng, c, d, 0.05, grid.half_fov[0])
    sl, inside, _, _ = blob.evaluate(grid)
    inside = inside & (anatomy.mask[sl] == 0)
    _paint(anatomy.labels, sl, inside, FOCUS + i)
    anatomy.focus_kinetics.append((rng.uniform(0.1, 0.4), rng.uniform(0.2, 0.7)))


def _anatomy(grid: _Grid, spec, patient: int, visit: int) -> tuple[_Anatomy, dict]:
  """The patient's body (same for all visits) with the visit's tumor."""
  # Independent streams, so that what one part draws never shifts another part.
  rng_p = np.random.default_rng([spec.seed, 1, patient])            # body
  rng_t = np.random.default_rng([spec.seed, 4, patient])            # tumor shape and place
  rng_k = np.random.default_rng([spec.seed, 5, patient])            # tumor kinetics
  rng_v = np.random.default_rng([spec.seed, 2, patient, visit])     # what changes per visit
  labels, breasts, depth_mm = _body(grid, rng_p)
  _fibroglandular(grid, rng_p, labels, breasts, depth_mm)
  _vessels(grid, rng_p, labels, breasts)
  anatomy = _Anatomy(labels, breasts, np.ones(grid.shape, np.float32),
                     np.zeros(grid.shape, np.uint8), [])
  breast_depth = ndimage.distance_transform_edt(breasts, sampling=grid.spacing)
  # Neoadjuvant chemotherapy between visits: the tumor shrinks and enhances less.
  shrink = 1.0 if visit == 1 else rng_v.uniform(0.5, 0.9)
  _tumor(grid, rng_t, rng_v, spec, anatomy, breast_depth, shrink)
  _foci(grid, np.random.default_rng([spec.seed, 6, patient]), anatomy, breast_depth)
  kinetics = {
      "tumor_ktrans": rng_k.uniform(0.6, 1.5) * (1.0 if visit == 1 else rng_v.uniform(0.5, 0.9)),
      "tumor_kep": rng_k.uniform(0.8, 2.0),
      "tumor_vp": rng_k.uniform(0.02, 0.08),
      # Background parenchymal enhancement: strength varies per exam, patchy in space.
      "bpe_ktrans": math.exp(rng_v.uniform(math.log(0.008), math.log(0.06))),
      "bpe_kep": rng_v.uniform(0.03, 0.15),
  }
  patches = np.clip(1 + 0.6 * grid.smooth_noise(rng_v, sigma_mm=0.1 * grid.half_fov[2]), 0.1, 2.5)
  fgt = labels == FGT
  anatomy.ktrans_mod[fgt] = patches[fgt]
  return anatomy, kinetics


# --- signal and acquisition ----------------------------------------------------------
def _class_kinetics(kinetics: dict, focus_kinetics: list) -> dict[int, tuple[float, float, float]]:
  """(Ktrans 1/min, kep 1/min, vp) per class id; blood is the AIF itself, C = (1 - Hct) Cp."""
  table = {
      AIR: (0.0, 1.0, 0.0), FAT: (0.01, 0.3, 0.005), FGT: (kinetics["bpe_ktrans"], kinetics["bpe_kep"], 0.0),
      SKIN: (0.05, 0.3, 0.05), MUSCLE: (0.08, 0.6, 0.03), LUNG: (0.0, 1.0, 0.0),
      BLOOD: (0.0, 1.0, 1.0 - HEMATOCRIT),   # Cb = (1 - Hct) Cp
      TUMOR: (kinetics["tumor_ktrans"], kinetics["tumor_kep"], kinetics["tumor_vp"]),
      NECROSIS: (0.005, 0.05, 0.0),
  }
  for i, (kt, kep) in enumerate(focus_kinetics):
    table[FOCUS + i] = (kt, kep, 0.03)
  return table


def _signal(anatomy: _Anatomy, kinetics: dict, times: np.ndarray, spec) -> np.ndarray:
  """Noise-free SPGR signal [T, S, H, W], normalised so that pre-contrast FGT is 1."""
  labels = anatomy.labels
  out = np.zeros((len(times),) + labels.shape, np.float32)
  ref = spgr_signal(1000.0 / _RELAXATION[FGT][0], 1.0, spec.flip_deg, spec.tr_ms)
  for cid, (ktrans, kep, vp) in _class_kinetics(kinetics, anatomy.focus_kinetics).items():
    where = labels == cid
    if not where.any():
      continue
    t10, m0 = _RELAXATION[min(cid, FOCUS)]
    if m0 == 0:
      continue
    cp_part = tofts_concentration(times, 0.0, kep, vp)          # vp Cp(t)
    leak = tofts_concentration(times, 1.0, kep, 0.0)            # unit-Ktrans response
    mod = anatomy.ktrans_mod[where]
    for k in range(len(times)):
      conc = cp_part[k] + ktrans * mod * leak[k]
      out[k][where] = spgr_signal(1000.0 / t10 + RELAXIVITY * conc, m0, spec.flip_deg, spec.tr_ms) / ref
  return out


def _bias_field(grid: _Grid, rng, amplitude: float) -> np.ndarray:
  """Smooth multiplicative coil-sensitivity field (exp of a random quadratic)."""
  u, v, w = grid.u, grid.v, grid.w
  terms = [u, v, w, u * u, v * v, u * v, v * w]
  coef = rng.normal(0.0, amplitude / 2, len(terms))
  return np.exp(sum(c * t for c, t in zip(coef, terms))).astype(np.float32)


def _acquire(signal: np.ndarray, grid: _Grid, rng, spec) -> np.ndarray:
  """Point spread, misregistration, bias field, scale, Rician noise.

  The mask is drawn in the frame of the first post-contrast phase, where readers
  annotate (the tumor is only visible there); the pre-contrast and later phases
  are rigidly misregistered against it.
  """
  scale = math.exp(rng.uniform(*np.log(spec.scale)))
  sigma = rng.uniform(*spec.noise)
  bias = _bias_field(grid, rng, spec.bias)
  images = np.empty_like(signal)
  for k in range(signal.shape[0]):
    phase = ndimage.gaussian_filter(signal[k], sigma=(0.4, 0.5, 0.5))
    if k != 1 and spec.max_shift_vox > 0:
      shift = rng.uniform(-1, 1, 3) * spec.max_shift_vox * np.array([0.5, 1.0, 1.0])
      phase = ndimage.shift(phase, shift, order=1, mode="nearest")
    phase = phase * bias
    real = phase + sigma * rng.standard_normal(phase.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(phase.shape, dtype=np.float32)
    images[k] = np.sqrt(real * real + imag * imag) * scale
  return np.round(images)                                         # scanners store integers


def _geometry(shape, spacing) -> dict[str, np.ndarray]:
  """SimpleITK-convention geometry (x, y, z order) of a grid centred on the origin."""
  sxyz = np.asarray(spacing[::-1], np.float64)
  size = np.asarray(shape[::-1], np.int64)
  return {"origin": -(size - 1) / 2 * sxyz, "spacing": sxyz,
          "direction": np.eye(3).ravel(), "size": size}


def _exam(index: int, config) -> tuple[int, int]:
  table = exam_table(config)
  if not 0 <= index < len(table):
    raise IndexError(f"exam index {index} outside 0..{len(table) - 1}")
  return table[index]


def make_labels(index: int, config) -> np.ndarray:
  """Tissue class ids (AIR, FAT, FGT, ..., FOCUS + i) of exam `index`: the phantom's ground truth.

  For analysis and tests: which voxels are parenchyma, vessels, benign foci, necrosis.
  """
  patient, visit = _exam(index, config)
  return _anatomy(_Grid(config.shape, config.spacing), config, patient, visit)[0].labels


def make_case(index: int, config) -> dict[str, Any]:
  """Record dict (see `records.check_case`) of exam `index` of the collection `config`.

  `config` is a synthetic_dce builder config (`SyntheticConfig`); the same config
  and index always give the same arrays.
  """
  patient, visit = _exam(index, config)
  grid = _Grid(config.shape, config.spacing)
  anatomy, kinetics = _anatomy(grid, config, patient, visit)
  rng_acq = np.random.default_rng([config.seed, 3, patient, visit])
  n_posts = int(rng_acq.integers(config.min_posts, len(config.post_times) + 1))
  times = np.asarray((config.pre_time,) + tuple(config.post_times[:n_posts]), np.float32)
  image = _acquire(_signal(anatomy, kinetics, times, config), grid, rng_acq, config)
  lo_mm, hi_mm = strata_thresholds_mm(config)
  d_eq = equivalent_diameter_mm(anatomy.mask, config.spacing)
  return {
      "image": image.astype(np.float32),
      "mask": anatomy.mask,
      "case_id": case_id(config, patient, visit),
      "patient_id": patient_id(config, patient),
      "spacing": np.asarray(config.spacing, np.float32),
      "phase_times": times,
      "strata": int(d_eq >= lo_mm) + int(d_eq >= hi_mm),
      "collection": f"synthetic_dce/{config.centre}",
      "source_geometry": _geometry(config.shape, config.spacing),
      "grid_geometry": _geometry(config.shape, config.spacing),
  }
