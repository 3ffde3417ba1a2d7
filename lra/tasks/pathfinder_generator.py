"""Pathfinder generator: a re-implementation of the generator behind LRA's Pathfinder and Path-X images.

Follows `snakes2.py` of github.com/drewlinsley/pathfinder (Linsley et al. 2018; Kim et al. 2020) with the settings
listed in LRA's `lra_benchmarks/data/pathfinder.py`:

* Two target "snakes" (dashed contours of `contour_length` paddles) start `seed_distance` pixels apart near the
  centre and grow alternately. A paddle is a line of `paddle_length` pixels. The next one ends on the ring of radius
  `paddle_length + margin` around the snake's cursor (`margin` past its head) and points away from it, so paddles are
  about `2 * margin` apart; its direction is drawn with weight `cos(min(turn * continuity, pi/2))^2` (a larger
  `continuity` makes straighter snakes).
* Distractor snakes (`num_distractor_snakes` of `distractor_length` paddles) are then seeded anywhere free; one that
  cannot be completed is dropped, as in the original. Single-paddle clutter (`use_single_paddles`) is off, as in
  `snakes2_wrapper.py`.
* Paths (paddles and the gaps between them) of different snakes, and non-consecutive paddles of one snake, stay
  `thickness + 2 * margin` apart: the original's rule that paddle masks (lines dilated by the margin) must not overlap.
* Two circles (`marker_radius`) mark the origin of one target snake and the far end of the same snake (label 1) or
  of the other target snake (label 0).
* The image is the maximum of the paddles (times their contrast) and the markers, rescaled so its maximum is 255
  (what `scipy.misc.imsave` did when the LRA data was made).

Deliberate differences from the original:
* Where a target snake gets stuck, the original redrew both target snakes from scratch: for contour length 14 well
  under 1% of the attempts succeed (0.3 s per 32-pixel image, 1.8 s per 128-pixel one). Here growth steps back a few
  random steps and each step draws among the directions that are free along their whole length (the original checked
  up to three draws at their far end only). Same growth rule, 10-50x faster.
* Collisions are checked exactly on the segment geometry. The original missed some (the newest paddle of each target
  snake and the two seed paddles were not in its mask), so its snakes could cross and some labels were wrong.
* Lines and circles are antialiased analytically instead of drawn at `antialias_scale` and Lanczos-resized.
* Labels are exactly balanced within each batch (the original drew each label at random); randomness comes from a
  `numpy.random.Generator` seeded per batch, so the output is a function of the seed.

Output uses the LRA release layout:

  pathfinder{N}/curv_{difficulty}/imgs/<batch>/sample_<i>.png   (8-bit grayscale PNG)
  pathfinder{N}/curv_{difficulty}/metadata/<batch>.npy          (text lines, as in the LRA release)

A metadata line is `imgs/<batch> sample_<i>.png <i> <label> <continuity> <contour_length> <distractor_length>
<paddle_length> <paddle_thickness> <margin> <number of paddle contrasts>`, the columns of `snakes2.accumulate_meta`.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Difficulty name (the LRA folder is `curv_<name>`) -> target contour length in paddles. LRA's TFDS builder calls
# them easy / intermediate / hard; the LRA table uses contour_length_14.
DIFFICULTIES: dict[str, int] = {"baseline": 6, "contour_length_9": 9, "contour_length_14": 14}

# Per-resolution settings from the docstrings of LRA's Pathfinder32/64/128/256 TFDS builders; unlisted values are
# the defaults of `snakes2_wrapper.py`. `distractor_budget` is the numerator of
# `num_distractor_snakes = budget // distractor_length`.
RESOLUTIONS: dict[int, dict] = {
    32: dict(padding=1, paddle_length=2, paddle_thickness=0.5, paddle_margins=(1,), marker_radius=1.5,
             seed_distance=7, continuity=1.0, snake_contrasts=(2.0,), paddle_contrasts=(0.75,), distractor_budget=20),
    64: dict(padding=1, paddle_length=5, paddle_thickness=1.0, paddle_margins=(1,), marker_radius=2.5,
             seed_distance=12, continuity=1.8, snake_contrasts=(0.8,), paddle_contrasts=(1.0,), distractor_budget=22),
    128: dict(padding=1, paddle_length=5, paddle_thickness=1.5, paddle_margins=(2, 3), marker_radius=3.0,
              seed_distance=20, continuity=1.8, snake_contrasts=(0.9,), paddle_contrasts=(1.0,),
              distractor_budget=35),
    256: dict(padding=22, paddle_length=5, paddle_thickness=2.0, paddle_margins=(3,), marker_radius=5.0,
              seed_distance=27, continuity=1.8, snake_contrasts=(1.0,), paddle_contrasts=(1.0,),
              distractor_budget=30),
}

# Whole-image attempts before giving up: a sample fails only when the target snakes cannot be grown.
_MAX_SAMPLE_ATTEMPTS = 1000
# Backtracking while growing the target snakes: failed steps per attempt, and the most steps undone at once.
_MAX_BACKTRACKS = 50
_MAX_BACKTRACK_STEPS = 12
# Directions checked at once while growing a snake.
_CHECK_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class Settings:
  """Generator settings for one resolution and difficulty (see `settings`)."""

  window_size: int
  padding: int
  paddle_length: int
  paddle_thickness: float
  paddle_margins: tuple[int, ...]
  marker_radius: float
  seed_distance: int
  continuity: float
  contour_length: int
  distractor_length: int
  num_distractor_snakes: int
  snake_contrasts: tuple[float, ...]
  paddle_contrasts: tuple[float, ...]
  use_single_paddles: bool = False
  max_distractor_retrial: int = 4
  max_paddle_retrial: int = 2


def settings(resolution: int, difficulty: str, **overrides) -> Settings:
  """The LRA settings for `resolution` (32, 64, 128, 256) and `difficulty` (a key of DIFFICULTIES)."""
  if resolution not in RESOLUTIONS:
    raise ValueError(f"resolution={resolution} has no LRA settings; valid choices: {sorted(RESOLUTIONS)}")
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"unknown Pathfinder difficulty {difficulty!r}; valid choices: {tuple(DIFFICULTIES)}")
  base = dict(RESOLUTIONS[resolution])
  contour_length = DIFFICULTIES[difficulty]
  # The original ran under Python 2, where `contour_length / 3` and `budget / distractor_length` are integer divisions.
  distractor_length = contour_length // 3
  budget = base.pop("distractor_budget")
  values = dict(window_size=resolution, contour_length=contour_length, distractor_length=distractor_length,
                num_distractor_snakes=budget // distractor_length, **base)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Settings)})
  if unknown:
    valid = [f.name for f in dataclasses.fields(Settings)]
    raise ValueError(f"unknown Pathfinder setting(s) {unknown}; valid: {valid}")
  values.update(overrides)
  return Settings(**values)


def folder_name(difficulty: str) -> str:
  """The LRA folder of a difficulty: `curv_baseline`, `curv_contour_length_9`, `curv_contour_length_14`."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"unknown Pathfinder difficulty {difficulty!r}; valid choices: {tuple(DIFFICULTIES)}")
  return f"curv_{difficulty}"


@dataclasses.dataclass
class Sample:
  """One image with its label and the generator's own ground truth.

  `target_masks[k]` is the contour mask of target snake k: the pixels near its path (paddles and gaps), a 4-connected
  region; the masks of different snakes never touch, not even 4-adjacently. `markers` are the (y, x) centres of the
  origin and terminal circles; `marker_snakes` says which target snake each marker sits on (equal for label 1).
  """

  image: np.ndarray
  label: int
  target_masks: np.ndarray
  markers: tuple[tuple[float, float], tuple[float, float]]
  marker_snakes: tuple[int, int]
  margin: int


def _unit(angle: float) -> np.ndarray:
  return np.array([math.sin(angle), math.cos(angle)])


def _squared_distance(py, px, ay, ax, by, bx):
  """Squared distance of points (py, px) to segments (ay, ax)-(by, bx); components broadcast."""
  aby, abx, apy, apx = by - ay, bx - ax, py - ay, px - ax
  t = np.clip((apy * aby + apx * abx) / np.maximum(aby * aby + abx * abx, 1e-12), 0.0, 1.0)
  dy, dx = apy - t * aby, apx - t * abx
  return dy * dy + dx * dx


def _segment_distances(p0: np.ndarray, p1: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`[J, N]` distances between the segments p0-p1 (`[J, 2]`) and a-b (`[N, 2]`)."""
  p0y, p0x, p1y, p1x = p0[:, :1], p0[:, 1:], p1[:, :1], p1[:, 1:]
  ay, ax, by, bx = a[None, :, 0], a[None, :, 1], b[None, :, 0], b[None, :, 1]
  # Without a crossing, the closest pair of points has an end point of one of the segments.
  d2 = np.minimum.reduce([_squared_distance(p0y, p0x, ay, ax, by, bx), _squared_distance(p1y, p1x, ay, ax, by, bx),
                          _squared_distance(ay, ax, p0y, p0x, p1y, p1x), _squared_distance(by, bx, p0y, p0x, p1y, p1x)])
  # Proper crossings: each segment's end points lie on both sides of the other.
  side = lambda oy, ox, dy, dx, qy, qx: dy * (qx - ox) - dx * (qy - oy)  # noqa: E731
  dpy, dpx, dy, dx = p1y - p0y, p1x - p0x, by - ay, bx - ax
  crossing = ((side(p0y, p0x, dpy, dpx, ay, ax) * side(p0y, p0x, dpy, dpx, by, bx) < 0) &
              (side(ay, ax, dy, dx, p0y, p0x) * side(ay, ax, dy, dx, p1y, p1x) < 0))
  return np.sqrt(np.where(crossing, 0.0, d2))


def _segment_field(size: int, a: np.ndarray, b: np.ndarray, reach: float):
  """Slices of the window around segment a-b grown by `reach`, and the distance of its pixel centres to the segment."""
  lo = np.floor(np.minimum(a, b) - reach).astype(int).clip(0, size)
  hi = (np.ceil(np.maximum(a, b) + reach).astype(int) + 1).clip(0, size)
  ys = np.arange(lo[0], hi[0], dtype=np.float64)[:, None]
  xs = np.arange(lo[1], hi[1], dtype=np.float64)[None, :]
  distance = np.sqrt(_squared_distance(ys, xs, a[0], a[1], b[0], b[1]))
  return (slice(lo[0], hi[0]), slice(lo[1], hi[1])), distance


class _Canvas:
  """The paths drawn so far as line segments: each paddle, and the gap leading to it, with its snake and index.

  Paths of different snakes (and non-consecutive paddles of one snake) stay `clearance` apart: the original's rule
  that the paddles' masks (lines dilated by the margin) must not overlap. A snake's contour mask is the set of pixels
  within `radius` of its path; `clearance > 2 * radius + 1` keeps the masks of different snakes from touching.
  """

  def __init__(self, s: Settings, margin: int, capacity: int = 4096):
    self.s, self.margin = s, margin
    # At least 2.5 so that a contour mask is wider than a pixel's diagonal (hence 4-connected).
    self.clearance = max(s.paddle_thickness + 2 * margin, 2.5)
    self.radius = (self.clearance - 1.05) / 2
    # Paths stay inside [lo, hi]^2 so that contour masks stay off the padding.
    self.lo, self.hi = s.padding + self.radius, s.window_size - 1 - s.padding - self.radius
    # Directions one pixel of arc apart on the ring a snake's next paddle ends on.
    self.ring = s.paddle_length + margin
    self.angles = np.arange(0.0, 2 * math.pi, 1.0 / self.ring)
    self.directions = np.stack([np.sin(self.angles), np.cos(self.angles)], axis=1)
    self.a, self.b = np.zeros((capacity, 2)), np.zeros((capacity, 2))
    self.owner, self.piece = np.zeros(capacity, int), np.zeros(capacity, int)
    self.ink = np.zeros(capacity, bool)  # a paddle (drawn), not a gap
    self.contrast = np.zeros(capacity)
    self.n = 0

  def inside(self, points: np.ndarray) -> np.ndarray:
    return np.all((points >= self.lo) & (points <= self.hi), axis=-1)

  def add(self, a: np.ndarray, b: np.ndarray, owner: int, piece: int, ink: bool, contrast: float = 0.0) -> None:
    if self.n == len(self.a):
      raise RuntimeError(f"more than {len(self.a)} path segments")
    i = self.n
    self.a[i], self.b[i], self.owner[i], self.piece[i] = a, b, owner, piece
    self.ink[i], self.contrast[i] = ink, contrast
    self.n += 1

  def distances(self, p0: np.ndarray, p1: np.ndarray, owner: int, skip_piece: int) -> np.ndarray:
    """`[J]` distances of the segments p0-p1 to every path segment except piece `skip_piece` of snake `owner`,
    or to `clearance` where that is the larger (distances past it are not resolved)."""
    n = self.n
    keep = ~((self.owner[:n] == owner) & (self.piece[:n] == skip_piece))
    # Only segments near the queried ones matter: a bounding circle of the queries culls the rest.
    points = np.concatenate([p0, p1])
    centre = points.mean(axis=0)
    reach = np.sqrt(np.max(np.sum((points - centre) ** 2, axis=1))) + self.clearance
    a, b = self.a[:n], self.b[:n]
    near = _squared_distance(centre[0], centre[1], a[:, 0], a[:, 1], b[:, 0], b[:, 1]) <= reach * reach
    keep &= near
    if not keep.any():
      return np.full(len(p0), self.clearance)
    return np.minimum(_segment_distances(p0, p1, a[keep], b[keep]).min(axis=1), self.clearance)

  def render(self) -> np.ndarray:
    """The paddles, antialiased analytically, times their contrast (float image)."""
    size = self.s.window_size
    image = np.zeros((size, size), np.float32)
    half = self.s.paddle_thickness / 2
    for i in np.flatnonzero(self.ink[:self.n]):
      sl, dist = _segment_field(size, self.a[i], self.b[i], half + 1)
      np.maximum(image[sl], np.clip(half + 0.5 - dist, 0.0, 1.0) * self.contrast[i], out=image[sl])
    return image

  def contour_mask(self, owner: int) -> np.ndarray:
    """Pixels within `radius` of the path of snake `owner`."""
    size = self.s.window_size
    mask = np.zeros((size, size), bool)
    for i in np.flatnonzero(self.owner[:self.n] == owner):
      sl, dist = _segment_field(size, self.a[i], self.b[i], self.radius + 1)
      mask[sl] |= dist <= self.radius
    return mask


class _Snake:
  """A snake on the canvas: where it started, its head and direction, and how many paddles it has."""

  def __init__(self, canvas: _Canvas, owner: int):
    self.canvas, self.owner = canvas, owner
    self.origin = self.head = np.zeros(2)
    self.angle, self.pieces = 0.0, 0

  def state(self) -> tuple:
    return self.head, self.angle, self.pieces

  def restore(self, state: tuple) -> None:
    self.head, self.angle, self.pieces = state

  def seed(self, rng: np.random.Generator, tails: np.ndarray, contrast: float, tries: int) -> bool:
    """Places the first paddle with its tail at one of `tails` (`[K, 2]`): `tries` random tails and directions are
    checked at once and the first free one is taken."""
    canvas, s = self.canvas, self.canvas.s
    tail = tails[rng.integers(len(tails), size=tries)].astype(float)
    # The original draws whole degrees in [-180, 180).
    angle = rng.integers(-180, 180, size=tries) * (math.pi / 180)
    head = tail + s.paddle_length * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    ok = canvas.inside(tail) & canvas.inside(head)
    if ok.any():
      ok[ok] = canvas.distances(tail[ok], head[ok], self.owner, -1) >= canvas.clearance
    if not ok.any():
      return False
    i = int(np.argmax(ok))
    canvas.add(tail[i], head[i], self.owner, 0, True, contrast)
    self.origin, self.head, self.angle, self.pieces = tail[i], head[i], float(angle[i]), 1
    return True

  def grow(self, rng: np.random.Generator, contrast: float) -> bool:
    """Adds one paddle (the original's `extend_snake`); False when no direction is free.

    The next paddle lies on the ring of radius `paddle_length + margin` around the cursor (`margin` past the head),
    pointing away from it; directions one pixel of arc apart are weighted `cos(min(turn * continuity, pi/2))^2`.
    Unlike the original, which tried up to `max_paddle_retrial + 1` directions checked only at their far end, every
    direction is checked whole and one is drawn among the free ones.
    """
    canvas, s = self.canvas, self.canvas.s
    margin, ring, angles, directions = canvas.margin, canvas.ring, canvas.angles, canvas.directions
    cursor = self.head + margin * _unit(self.angle)
    if not canvas.inside(cursor):
      return False
    heads = cursor + ring * directions
    turn = np.abs((angles - self.angle + math.pi) % (2 * math.pi) - math.pi)
    weights = np.cos(np.minimum(turn * s.continuity, math.pi / 2)) ** 2
    # Looking one paddle ahead: a paddle whose next cursor would leave the image is a dead end. (The box is convex,
    # so the paddle itself is inside when the cursor and that next cursor are.)
    weights *= canvas.inside(cursor + (ring + margin) * directions)
    candidates = np.flatnonzero(weights > 1e-12)
    if len(candidates) == 0:
      return False
    # Directions in the order of sampling without replacement by weight (Gumbel top-k), checked a few at a time: the
    # first free one is a draw from the free directions in proportion to their weights.
    keys = np.log(weights[candidates]) + rng.gumbel(size=len(candidates))
    order = candidates[np.argsort(-keys)]
    for start in range(0, len(order), _CHECK_CHUNK):
      chunk = order[start:start + _CHECK_CHUNK]
      # Row 0 (first chunk only): the gap from the head to the cursor, which every direction shares.
      gap = start == 0
      if gap:
        p0 = np.concatenate([self.head[None], np.broadcast_to(cursor, (len(chunk), 2))])
        p1 = np.concatenate([cursor[None], heads[chunk]])
      else:
        p0, p1 = np.broadcast_to(cursor, (len(chunk), 2)), heads[chunk]
      free = canvas.distances(p0, p1, self.owner, self.pieces - 1) >= canvas.clearance
      if gap:
        if not free[0]:
          return False
        free = free[1:]
      if free.any():
        i = int(chunk[np.argmax(free)])
        break
    else:
      return False
    tail = cursor + margin * directions[i]
    # The gap turns at the cursor; the paddle starts `margin` past it.
    canvas.add(self.head, cursor, self.owner, self.pieces, False)
    canvas.add(cursor, tail, self.owner, self.pieces, False)
    canvas.add(tail, heads[i], self.owner, self.pieces, True, contrast)
    self.head, self.angle, self.pieces = heads[i], float(angles[i]), self.pieces + 1
    return True


def _target_snakes(canvas: _Canvas, rng: np.random.Generator) -> list[_Snake] | None:
  """The two target snakes (the original's `two_snakes`), or None when they could not be completed."""
  s = canvas.s
  size = s.window_size
  mu = list(s.snake_contrasts) * 2
  rng.shuffle(mu)
  pick = lambda: s.paddle_contrasts[rng.integers(len(s.paddle_contrasts))]  # noqa: E731
  # The first origin keeps 2 * seed_distance from the border, so both origins sit near the centre.
  lo, hi = 2 * s.seed_distance, size - 2 * s.seed_distance
  if hi <= lo:
    raise ValueError(f"seed_distance={s.seed_distance} leaves no room in a {size}-pixel window")
  grid = np.stack(np.meshgrid(np.arange(lo, hi), np.arange(lo, hi), indexing="ij"), -1).reshape(-1, 2)
  snakes = [_Snake(canvas, 0), _Snake(canvas, 1)]
  tries = s.max_paddle_retrial + 1
  if not snakes[0].seed(rng, grid, pick() * mu[0], tries):
    return None
  for _ in range(tries):
    direction = float(rng.integers(0, 360)) * math.pi / 180
    tail = np.rint(snakes[0].origin + s.seed_distance * _unit(direction))
    if snakes[1].seed(rng, tail[None], pick() * mu[1], 1):
      break
  else:
    return None
  # The snakes grow alternately, one paddle per step. Where a snake is stuck, the original redrew both snakes from
  # scratch, which succeeds well under 1% of the time for contour length 14 (seconds per image); stepping back a few
  # random steps keeps the growth rule at a small fraction of the cost.
  num_steps = 2 * (s.contour_length - 1)
  history: list[tuple] = []  # history[t]: the state before step t
  step, failures = 0, 0
  while step < num_steps:
    if len(history) == step:
      history.append((canvas.n, [snake.state() for snake in snakes]))
    k = step % 2
    if snakes[k].grow(rng, pick() * mu[k]):
      step += 1
      continue
    failures += 1
    if failures > _MAX_BACKTRACKS or step < 2:  # stuck right at the seeds: draw new seeds
      return None
    step = max(0, step - int(rng.integers(1, _MAX_BACKTRACK_STEPS + 1)))
    canvas.n, states = history[step]
    for snake, state in zip(snakes, states):
      snake.restore(state)
    del history[step + 1:]
  return snakes


def _distractors(canvas: _Canvas, rng: np.random.Generator, num_snakes: int, num_paddles: int, max_retrial: int,
                 first_owner: int) -> int:
  """Adds up to `num_snakes` snakes of `num_paddles` paddles anywhere free (the original's `make_many_snakes`); a
  snake that cannot be completed is dropped. Returns the next free owner id."""
  s = canvas.s
  lo, hi = math.ceil(canvas.lo), math.floor(canvas.hi) + 1
  grid = np.stack(np.meshgrid(np.arange(lo, hi), np.arange(lo, hi), indexing="ij"), -1).reshape(-1, 2)
  owner = first_owner
  for _ in range(num_snakes):
    for _ in range(max_retrial + 1):
      start = canvas.n
      snake = _Snake(canvas, owner)
      contrast = lambda: s.snake_contrasts[rng.integers(len(s.snake_contrasts))]  # noqa: E731
      # The original seeds among the free pixels; drawing positions until one is free comes to the same.
      if snake.seed(rng, grid, contrast(), tries=50) and all(
          snake.grow(rng, contrast()) for _ in range(num_paddles - 1)):
        owner += 1
        break
      canvas.n = start
  return owner


def _disc(size: int, centre: Sequence[float], radius: float) -> np.ndarray:
  ys = np.arange(size, dtype=np.float32)
  dist = np.hypot(ys[:, None] - centre[0], ys[None, :] - centre[1])
  return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def draw_sample(rng: np.random.Generator, s: Settings, label: int) -> Sample:
  """One Pathfinder image with the given label (1: the markers are on one snake; 0: on different snakes)."""
  if label not in (0, 1):
    raise ValueError(f"label must be 0 or 1, got {label!r}")
  for _ in range(_MAX_SAMPLE_ATTEMPTS):
    margin = int(s.paddle_margins[rng.integers(len(s.paddle_margins))])
    canvas = _Canvas(s, margin)
    targets = _target_snakes(canvas, rng)
    if targets is None:
      continue
    owner = _distractors(canvas, rng, s.num_distractor_snakes, s.distractor_length, s.max_distractor_retrial, 2)
    if s.use_single_paddles:
      # The original's paddle budget: 150 paddles at margin 4, scaled by the area a paddle takes at this margin.
      total = int(150 / ((7.5 + 13 * margin + 4 * margin * margin) / 123.5))
      count = total - 2 * s.contour_length - s.num_distractor_snakes * s.distractor_length
      _distractors(canvas, rng, max(count, 0), 1, s.max_paddle_retrial, owner)
    origin_snake = int(rng.integers(2))
    terminal_snake = origin_snake if label == 1 else 1 - origin_snake
    markers = (tuple(targets[origin_snake].origin.tolist()), tuple(targets[terminal_snake].head.tolist()))
    image = canvas.render()
    for centre in markers:
      image = np.maximum(image, _disc(s.window_size, centre, s.marker_radius))
    image = np.rint(image / image.max() * 255.0).astype(np.uint8)
    masks = np.stack([canvas.contour_mask(0), canvas.contour_mask(1)])
    return Sample(image, label, masks, markers, (origin_snake, terminal_snake), margin)
  raise RuntimeError(f"could not place two target snakes in {_MAX_SAMPLE_ATTEMPTS} attempts with {s}")


def metadata_line(batch: int, index: int, label: int, s: Settings, margin: int) -> str:
  """One metadata row in the column order of `snakes2.accumulate_meta`."""
  return (f"imgs/{batch} sample_{index}.png {index} {label} {s.continuity} {s.contour_length} "
          f"{s.distractor_length} {s.paddle_length} {s.paddle_thickness} {margin} {len(s.paddle_contrasts)}")


def _write_atomic(path: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_batch(folder: Path, s: Settings, batch: int, num_images: int, seed: int) -> int:
  """Writes `imgs/<batch>/sample_<i>.png` and then `metadata/<batch>.npy` (its presence marks the batch done).

  Half the labels (rounded down) are 1, in a random order. Returns the number of images written.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  folder = Path(folder)
  rng = np.random.default_rng([seed, s.window_size, s.contour_length, batch])
  labels = np.arange(num_images) % 2
  rng.shuffle(labels)
  image_dir = folder / "imgs" / str(batch)
  image_dir.mkdir(parents=True, exist_ok=True)
  (folder / "metadata").mkdir(parents=True, exist_ok=True)
  lines = []
  for i, label in enumerate(labels):
    sample = draw_sample(rng, s, int(label))
    Image.fromarray(sample.image).save(image_dir / f"sample_{i}.png")
    lines.append(metadata_line(batch, i, int(label), s, sample.margin))
  _write_atomic(folder / "metadata" / f"{batch}.npy", ("\n".join(lines) + "\n").encode())
  return num_images


def _write_batch_job(args: tuple) -> int:
  return write_batch(*args)


def generate_pathfinder(output_dir: str | Path, *, resolution: int = 32, difficulties: Iterable[str] = ("baseline",
                        "contour_length_9", "contour_length_14"), num_images: int = 200_000,
                        images_per_batch: int = 1000, num_workers: int | None = None, seed: int = 0,
                        progress: bool = False, **overrides) -> dict[str, Path]:
  """Generates `num_images` images per difficulty under `output_dir/pathfinder{resolution}/curv_<difficulty>/`.

  Batches whose metadata file exists are skipped, so an interrupted run resumes. `num_workers` processes (default:
  all cores; 1 = in this process) each write whole batches. `overrides` replace individual `Settings` fields.
  Returns the folder of each difficulty.
  """
  if num_images < 1:
    raise ValueError(f"num_images={num_images} must be >= 1")
  if images_per_batch < 1:
    raise ValueError(f"images_per_batch={images_per_batch} must be >= 1")
  difficulties = list(difficulties)
  folders = {d: Path(output_dir) / f"pathfinder{resolution}" / folder_name(d) for d in difficulties}
  jobs = []
  for difficulty, folder in folders.items():
    s = settings(resolution, difficulty, **overrides)
    for batch in range(math.ceil(num_images / images_per_batch)):
      count = min(images_per_batch, num_images - batch * images_per_batch)
      if not (folder / "metadata" / f"{batch}.npy").exists():
        jobs.append((folder, s, batch, count, seed))
  num_workers = num_workers or os.cpu_count() or 1
  if num_workers < 1:
    raise ValueError(f"num_workers={num_workers} must be >= 1")
  import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm.tqdm(total=sum(j[3] for j in jobs), unit="img", disable=not progress, desc="pathfinder") as bar:
    if num_workers == 1 or len(jobs) <= 1:
      for job in jobs:
        bar.update(_write_batch_job(job))
    else:
      # spawn, not fork: the caller may be a training process whose JAX threads must not be forked.
      with multiprocessing.get_context("spawn").Pool(min(num_workers, len(jobs))) as pool:
        for count in pool.imap_unordered(_write_batch_job, jobs):
          bar.update(count)
  return folders
