"""experiments.compute_spent: training core-hours over run records, a copied run counted once."""

import json

import pytest

from experiments.compute_spent import main, training_runs


def _record(root, name, **summary):
    path = root / name / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"table": "table1", "protocol": "geneval", "git_commit": "abc", **summary}))


def test_hours_are_iteration_time_times_steps_and_a_copy_counts_once(tmp_path, capsys):
    records, pilot = tmp_path / "records", tmp_path / "pilot"
    _record(records, "tmpo/seed0", row="tmpo", seed=0, iter_time_s=1.8, steps=300)     # 540 s
    _record(records, "gardo/seed0", row="gardo", seed=0, iter_time_s=6.0, steps=120)   # 720 s
    _record(pilot, "x3/tmpo/seed0", row="tmpo", seed=0, iter_time_s=1.8, steps=300)    # the same run, copied
    _record(pilot, "x1/tmpo/seed0", row="tmpo", seed=0, iter_time_s=1.7, steps=300)    # 510 s, another run
    runs = training_runs([records, pilot])
    assert len(runs) == 3
    assert runs.groupby("root").core_h.sum().to_dict() == pytest.approx(
        {str(records): (540 + 720) / 3600, str(pilot): 510 / 3600})
    assert main([str(records), str(pilot)]) == 0
    assert "3 distinct runs: 0.49 core-hours of training = 0.25 h on two one-thread lanes" in capsys.readouterr().out


def test_an_unfinished_summary_or_a_missing_root_is_refused(tmp_path):
    _record(tmp_path / "records", "tmpo/seed0", row="tmpo", seed=0, steps=300)
    with pytest.raises(ValueError, match="has no iter_time_s"):
        training_runs([tmp_path / "records"])
    with pytest.raises(FileNotFoundError, match="not a directory of run records"):
        training_runs([tmp_path / "nowhere"])
