"""scripts/lra_table.py on fake workdirs: one row per variant, best run by validation, published numbers alongside."""

import csv
import io
import json
import pathlib
import re
import subprocess
import sys

from tests.conftest import load_script

ROOT = pathlib.Path(__file__).resolve().parents[2]
lra_table = load_script("lra_table", "lra_table")


def _workdir(root, name, task, variant, test, validation=None, synthetic=False):
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {"task": task, "model": {"attention": {"name": variant}}, "data": {"synthetic": synthetic}}
  (workdir / "config.json").write_text(json.dumps(config))
  (workdir / "eval_test.json").write_text(json.dumps({"split": "test", "step": 10, "accuracy": test}))
  lines = [{"step": 5, "split": "train", "loss": 1.0}]
  if validation is not None:
    lines += [{"step": 5, "split": "validation", "accuracy": validation - 0.1},
              {"step": 10, "split": "validation", "accuracy": validation}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _fake_runs(root):
  for task, test in zip(lra_table.AVERAGED, (0.30, 0.60, 0.55, 0.40, 0.70)):
    _workdir(root, f"softmax_{task}", task, "softmax", test, validation=0.5)
  _workdir(root, "softmax_pathx", "pathx", "softmax", 0.5, validation=0.5)
  # A sweep: the better validation run wins even though its test accuracy is lower.
  _workdir(root, "sweep/performer_lr1", "text", "performer", 0.70, validation=0.60)
  _workdir(root, "sweep/performer_lr2", "text", "performer", 0.65, validation=0.62)
  _workdir(root, "performer_retrieval", "retrieval", "performer", 0.9, validation=0.9, synthetic=True)
  _workdir(root, "based_listops", "listops", "based", 0.25)
  _workdir(root, "unfinished", "image", "based", 0.1)
  (root / "unfinished" / "eval_test.json").unlink()  # not evaluated: left out
  (root / "not_lra").mkdir()
  (root / "not_lra" / "config.json").write_text(json.dumps({"task": "wikitext2", "model": {}}))


def test_markdown_table(tmp_path):
  _fake_runs(tmp_path)
  markdown, _ = lra_table.build(tmp_path)
  lines = markdown.splitlines()
  assert lines[0] == "| Model | ListOps | Text | Retrieval | Image | Path | Path-X | Avg |"
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:5]}
  assert rows["Transformer"] == ["30.00 (36.37)", "60.00 (64.27)", "55.00 (57.46)", "40.00 (42.44)",
                                 "70.00 (71.40)", "50.00 (FAIL)", "51.00 (54.39)"]
  assert rows["Performer"][1] == "65.00 (65.40)"  # best validation, not best test
  assert rows["Performer"][2] == "90.00† (53.82)"
  assert rows["Performer"][0] == "- (18.01)" and rows["Performer"][-1].startswith("65.00*")  # synthetic left out
  assert rows["based"] == ["25.00", "-", "-", "-", "-", "-", "25.00*"]  # no published numbers
  assert any(line.startswith("† ") and "synthetic" in line for line in lines)
  assert any(line.startswith("* average over the tasks") for line in lines)


def test_csv_table(tmp_path):
  _fake_runs(tmp_path)
  _, csv_text = lra_table.build(tmp_path)
  rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(csv_text))}
  assert set(rows) == {"softmax", "performer", "based"}
  assert rows["softmax"]["text"] == "60.00" and rows["softmax"]["text_published"] == "64.27"
  assert rows["softmax"]["pathx_published"] == "FAIL" and rows["softmax"]["average"] == "51.00"
  assert rows["softmax"]["average_published"] == "54.39" and rows["softmax"]["average_tasks"] == "5"
  assert rows["performer"]["retrieval_synthetic"] == "1" and rows["based"]["listops_published"] == ""


def test_command_line_writes_both_formats(tmp_path):
  _fake_runs(tmp_path / "runs")
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lra_table.py"), str(tmp_path / "runs"),
                         f"--output={tmp_path / 'table'}"], capture_output=True, text=True, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "table.md").read_text().startswith("| Model |")
  assert (tmp_path / "table.csv").read_text().startswith("variant,listops,")


def _sets(cache, num_steps):
  """Two tiny ListOps points (softmax, linear) at runlocal scale, shrunk further."""
  return ["data.max_length=48", "data.generate.num_train=256", "data.generate.num_val=64",
          "data.generate.num_test=64", "data.generate.min_length=8", "data.generate.max_length=48",
          "model.num_layers=1", "model.emb_dim=32", "model.qkv_dim=32", "model.mlp_dim=32", "model.head_mlp_dim=32",
          "train.batch_size=8", "train.eval_batch_size=64", "train.warmup_steps=1", "train.eval_every_steps=100000",
          "train.checkpoint_every_steps=100000", f"data.cache_dir={cache}", f"train.num_steps={num_steps}"]


def test_run_stops_within_the_budget_and_resumes(data_cache, tmp_path):
  # The command line with 1 s: the first point cannot reach its 100,000 steps; the time limit (a SIGTERM to itself,
  # repeated every second: one that lands while data loads or the step compiles is only noted) stops it at a checkpoint
  # at the first step boundary the training loop's guard sees, the second point does not start, and the (empty) table
  # with both points' status is written. A longer budget only trains more steps (and the resume more linear steps).
  command = [sys.executable, str(ROOT / "scripts" / "lra_table.py"), str(tmp_path), "--run", "--protocol=small",
             "--runlocal", "--tasks=listops", "--variants=softmax,linear", "--time_budget=1",
             *(f"--set={s}" for s in _sets(data_cache, 100000))]
  proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (tmp_path / "lra_table.md").read_text()
  stopped = re.search(r"`listops/softmax`: stopped at step (\d+)", table)
  assert stopped, table
  step = int(stopped.group(1))
  assert (tmp_path / "listops" / "softmax" / "checkpoints" / str(step)).is_dir()
  assert "`listops/linear`: new" in table
  # The next call goes on where it stopped (the step count may grow on resume) and finishes both points; in process,
  # as main calls it from the same flags (one interpreter start fewer; no time budget, so no signal).
  points = lra_table.protocol_points(["listops"], ["softmax", "linear"], ["none"], runlocal=True)
  statuses = lra_table.run_protocol(tmp_path, "small", points,
                                    overrides=lra_table._key_values(_sets(data_cache, step + 3), "set"))
  assert statuses == {"listops/softmax": "done", "listops/linear": "done"}, statuses
  table = (tmp_path / "lra_table.md").read_text()
  assert "`listops/softmax`: done" in table and "`listops/linear`: done" in table
  train_steps = [json.loads(line)["step"] for line in
                 (tmp_path / "listops" / "softmax" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "train"]
  assert train_steps[-1] == step + 3 and len(train_steps) == len(set(train_steps))  # resumed, not restarted
  lines = table.splitlines()
  assert lines[0].startswith("| Model | ListOps |")
  rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "Model" not in line}
  assert set(rows) == {"Transformer", "Linear Trans."}
  assert "(37.10)" in rows["Transformer"]  # the small protocol's published Transformer, beside ours
  assert "Xiong et al. 2021" in table
