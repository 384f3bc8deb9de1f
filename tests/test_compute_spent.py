"""experiments.compute_spent: training core-hours over run records, a copied run counted once."""

import json

import pytest
import yaml

from experiments.compute_spent import main, training_runs


def _record(root, name, row, seed, iter_times, finished=True):
    """A run directory as the suite records it: config, per-iteration metrics, final summary."""
    run = root / name
    run.mkdir(parents=True)
    steps = len(iter_times)
    config = {"method": row, "trainer": {"seed": seed, "total_steps": steps},
              "tags": {"table": "table1", "protocol": "geneval", "row": row}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "iter_time_s": t, "train/reward_mean": 0.5}) + "\n" for i, t in enumerate(iter_times, 1)))
    summary = {"steps": steps if finished else steps - 1, "git_commit": "abc", "iter_time_s": sum(iter_times) / steps}
    (run / "summary.json").write_text(json.dumps(summary))


def test_hours_are_the_summed_iteration_times_and_a_copy_counts_once(tmp_path, capsys):
    records, pilot = tmp_path / "records", tmp_path / "pilot"
    _record(records, "tmpo/seed0", "tmpo", 0, [180.0] * 3)        # 540 s
    _record(records, "gardo/seed0", "gardo", 0, [180.0] * 4)      # 720 s
    _record(pilot, "x3/tmpo/seed0", "tmpo", 0, [180.0] * 3)       # the same run, copied
    _record(pilot, "x1/tmpo/seed0", "tmpo", 0, [170.0] * 3)       # 510 s, another run
    runs = training_runs([records, pilot])
    assert len(runs) == 3
    assert runs.groupby("root").core_h.sum().to_dict() == pytest.approx(
        {str(records): (540 + 720) / 3600, str(pilot): 510 / 3600})
    assert main([str(records), str(pilot)]) == 0
    assert "3 distinct runs: 0.49 core-hours of training = 0.25 h on two one-thread lanes" in capsys.readouterr().out


def test_an_unfinished_run_or_a_missing_root_is_refused(tmp_path):
    _record(tmp_path / "records", "tmpo/seed0", "tmpo", 0, [1.0] * 3, finished=False)
    with pytest.raises(ValueError, match="not a finished training run: its summary is at step 2 of 3"):
        training_runs([tmp_path / "records"])
    with pytest.raises(FileNotFoundError, match="not a directory of run records"):
        training_runs([tmp_path / "nowhere"])
