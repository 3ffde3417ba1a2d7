"""The Pathfinder generator: LRA settings, labels balanced and true on the generator's own contour masks (markers
connected for label 1, not for label 0), paths kept apart, the LRA file layout, resuming, determinism."""

from collections import deque

import numpy as np
import pytest
from PIL import Image

from lra.tasks import pathfinder_generator as pg


def _component(mask: np.ndarray, start: tuple[int, int]) -> np.ndarray:
  """The 4-connected component of `mask` holding `start` (a flood fill written here, independent of the generator)."""
  seen = np.zeros_like(mask)
  seen[start] = True
  queue = deque([start])
  while queue:
    y, x = queue.popleft()
    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
      if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
        seen[ny, nx] = True
        queue.append((ny, nx))
  return seen


def test_lra_settings():
  s = pg.settings(32, "contour_length_14")
  assert (s.window_size, s.padding, s.paddle_length, s.paddle_thickness, s.paddle_margins, s.marker_radius,
          s.seed_distance, s.continuity) == (32, 1, 2, 0.5, (1,), 1.5, 7, 1.0)
  assert (s.contour_length, s.distractor_length, s.num_distractor_snakes) == (14, 4, 5)
  assert (s.snake_contrasts, s.paddle_contrasts) == ((2.0,), (0.75,))
  s = pg.settings(128, "contour_length_14")
  assert (s.paddle_length, s.paddle_thickness, s.paddle_margins, s.marker_radius, s.seed_distance) == (
      5, 1.5, (2, 3), 3.0, 20)
  assert (s.distractor_length, s.num_distractor_snakes) == (4, 8)
  assert [pg.settings(64, d).contour_length for d in pg.DIFFICULTIES] == [6, 9, 14]
  assert pg.settings(256, "baseline").padding == 22
  with pytest.raises(ValueError, match="resolution=48 has no LRA settings; valid choices: \\[32, 64, 128, 256\\]"):
    pg.settings(48, "baseline")
  with pytest.raises(ValueError, match="unknown Pathfinder difficulty 'hard'.*contour_length_14"):
    pg.settings(32, "hard")
  with pytest.raises(ValueError, match="unknown Pathfinder setting"):
    pg.settings(32, "baseline", wiggle=3)


@pytest.mark.parametrize("resolution, difficulty, count", [(32, "contour_length_14", 12), (32, "baseline", 6),
                                                           (64, "contour_length_9", 4), (128, "contour_length_14", 4),
                                                           (256, "baseline", 2)])
def test_markers_are_connected_exactly_for_positive_labels(resolution, difficulty, count):
  s = pg.settings(resolution, difficulty)
  rng = np.random.default_rng(resolution)
  for i in range(count):
    label = i % 2
    sample = pg.draw_sample(rng, s, label)
    assert sample.image.shape == (resolution, resolution) and sample.image.dtype == np.uint8
    assert sample.label == label and sample.image.max() == 255
    masks = sample.target_masks
    assert not (masks[0] & masks[1]).any()
    origin, terminal = (tuple(np.rint(m).astype(int)) for m in sample.markers)
    assert masks[sample.marker_snakes[0]][origin] and masks[sample.marker_snakes[1]][terminal]
    assert (sample.marker_snakes[0] == sample.marker_snakes[1]) == bool(label)
    # Connected along the contours: within the union of both target masks, so touching snakes would show up.
    reached = _component(masks[0] | masks[1], origin)
    assert bool(reached[terminal]) == bool(label), (resolution, difficulty, i)
    for k in range(2):  # each contour is one piece
      assert _component(masks[k], tuple(np.argwhere(masks[k])[0])).sum() == masks[k].sum()
    assert sample.image[masks[0] | masks[1]].max() > 0  # the contours are drawn


def test_paths_keep_their_clearance():
  s = pg.settings(32, "contour_length_14")
  rng = np.random.default_rng(0)
  for _ in range(5):
    canvas = pg._Canvas(s, 1)
    snakes = pg._target_snakes(canvas, rng)
    if snakes is None:
      continue
    pg._distractors(canvas, rng, s.num_distractor_snakes, s.distractor_length, s.max_distractor_retrial, 2)
    a, b = canvas.a[:canvas.n], canvas.b[:canvas.n]
    owner, piece = canvas.owner[:canvas.n], canvas.piece[:canvas.n]
    distance = pg._segment_distances(a, b, a, b)
    neighbours = (owner[:, None] == owner[None]) & (np.abs(piece[:, None] - piece[None]) <= 1)
    assert (distance[~neighbours] >= canvas.clearance - 1e-9).all()
    assert all(snake.pieces == s.contour_length for snake in snakes)
    assert canvas.inside(a).all() and canvas.inside(b).all()


def test_writes_the_lra_layout_with_balanced_labels(tmp_path):
  folders = pg.generate_pathfinder(tmp_path, resolution=32, difficulties=["baseline", "contour_length_9"],
                                   num_images=10, images_per_batch=4, num_workers=1, seed=1)
  assert folders == {d: tmp_path / "pathfinder32" / f"curv_{d}" for d in ("baseline", "contour_length_9")}
  folder = folders["contour_length_9"]
  assert sorted(p.name for p in (folder / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
  rows = [line.split() for b in range(3) for line in (folder / "metadata" / f"{b}.npy").read_text().splitlines()]
  assert len(rows) == 10
  assert rows[5][:3] == ["imgs/1", "sample_1.png", "1"]
  assert all(len(r) == 11 and r[5] == "9" and r[6] == "3" for r in rows)  # contour and distractor lengths
  assert sum(int(r[3]) for r in rows) == 5  # 2 + 2 + 1 positives: balanced per batch
  image = Image.open(folder / "imgs" / "2" / "sample_1.png")
  assert image.mode == "L" and image.size == (32, 32)


def test_resumes_and_is_deterministic(tmp_path):
  kwargs = dict(resolution=32, difficulties=["baseline"], num_images=6, images_per_batch=3, num_workers=1)
  folder = pg.generate_pathfinder(tmp_path / "a", seed=4, **kwargs)["baseline"]
  first = (folder / "imgs" / "1" / "sample_2.png").read_bytes()
  (folder / "metadata" / "1.npy").unlink()  # batch 1 "interrupted"
  (folder / "imgs" / "1" / "sample_2.png").unlink()
  (folder / "imgs" / "0" / "sample_0.png").write_bytes(b"kept")  # a finished batch is not redone
  pg.generate_pathfinder(tmp_path / "a", seed=4, **kwargs)
  assert (folder / "imgs" / "1" / "sample_2.png").read_bytes() == first
  assert (folder / "imgs" / "0" / "sample_0.png").read_bytes() == b"kept"
  other = pg.generate_pathfinder(tmp_path / "b", seed=5, **kwargs)["baseline"]
  assert (other / "imgs" / "1" / "sample_2.png").read_bytes() != first


def test_worker_processes_write_the_same_images(tmp_path):
  kwargs = dict(resolution=32, difficulties=["baseline"], num_images=4, images_per_batch=2, seed=2)
  one = pg.generate_pathfinder(tmp_path / "one", num_workers=1, **kwargs)["baseline"]
  two = pg.generate_pathfinder(tmp_path / "two", num_workers=2, progress=True, **kwargs)["baseline"]
  for path in sorted(one.rglob("*.*")):
    assert (two / path.relative_to(one)).read_bytes() == path.read_bytes(), path


@pytest.mark.parametrize("kwargs, match", [(dict(num_images=0), "num_images=0"),
                                           (dict(images_per_batch=0), "images_per_batch=0"),
                                           (dict(resolution=100), "resolution=100"),
                                           (dict(difficulties=["easy"]), "'easy'")])
def test_argument_errors(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pg.generate_pathfinder(tmp_path, **{"num_workers": 1, **kwargs})
  with pytest.raises(ValueError, match="label must be 0 or 1"):
    pg.draw_sample(np.random.default_rng(0), pg.settings(32, "baseline"), 2)
