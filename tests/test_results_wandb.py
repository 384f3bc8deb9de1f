"""Reading a wandb project: WandbRuns against a local fake of wandb's public API (``Api.runs(path,
filters)`` -> runs with ``id``, ``state``, ``config``, ``summary_metrics``, ``scan_history(keys)``), built
from the same hand-made runs as the local reader: both sources must give identical tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from synthetic_runs import write_block, write_mini_suite, write_run
from tmpo.results.__main__ import main
from tmpo.results.aggregate import Options, ResultsError, build_tables
from tmpo.results.labels import TABLE_LABELS
from tmpo.results.runs import LocalRuns, WandbRuns

LABEL_KEYS = {"method", "ablation", "model", "seed", "git_commit", "git_dirty", *TABLE_LABELS}


class FakeRun:
    """What wandb.apis.public.Run exposes and WandbRuns reads, from a local run directory as the
    RunLogger would have synced it: config + ``labels``, summary without the labels, history rows."""

    def __init__(self, run_dir, state="finished"):
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        self.id = f"{run_dir.parent.name}-{run_dir.name}"
        self.state = state
        self.config = {**config, "labels": {k: v for k, v in summary.items() if k in LABEL_KEYS}}
        self.summary_metrics = {k: v for k, v in summary.items() if k not in LABEL_KEYS}
        self._rows = [{**json.loads(x), "_step": json.loads(x)["step"]}
                      for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        self.scanned_keys = None

    def scan_history(self, keys=None, page_size=1000):
        self.scanned_keys = keys
        return iter([r for r in self._rows if keys is None or all(k in r for k in keys)])


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path=None, filters=None, **kw):
        self.calls.append((path, filters))
        return iter(self._runs)


def fake_api(root, states=None):
    return FakeApi([FakeRun(d, (states or {}).get(d.name, "finished")) for d in LocalRuns(root).run_dirs()])


def test_a_wandb_project_gives_the_same_tables_as_the_run_dirs(tmp_path):
    write_mini_suite(tmp_path)
    api = fake_api(tmp_path)
    wandb = build_tables(WandbRuns("me/tmpo", {"tags": {"$in": ["mini"]}}, api=api).records(), Options("mini"))
    local = build_tables(LocalRuns(tmp_path).records(), Options("mini"))
    assert api.calls == [("me/tmpo", {"tags": {"$in": ["mini"]}})]
    assert set(wandb) == set(local) == {"table1", "table2", "table5", "table6"}
    for name in local:
        pd.testing.assert_frame_equal(wandb[name], local[name])


def test_cli_reads_wandb_with_the_scale_filter_and_writes_the_tables(tmp_path):
    write_block(tmp_path / "runs", "table5", "joint")
    api = fake_api(tmp_path / "runs")
    out = tmp_path / "out"
    rc = main(["--scale", "mini", "--source", "wandb", "--wandb", "me/tmpo", "--filters", '{"state": "finished"}',
               "--out", str(out)], wandb_api=api)
    assert rc == 0 and api.calls == [("me/tmpo", {"tags": {"$in": ["mini"]}, "state": "finished"})]
    assert "from `wandb:me/tmpo`" in (out / "table5.md").read_text()
    assert api._runs[0].scanned_keys == ["step", "iter_time_s", "train/reward_mean"]
    with pytest.raises(SystemExit, match="needs --wandb <entity>/<project>"):
        main(["--source", "wandb"], wandb_api=api)


def test_a_running_or_crashed_wandb_run_is_unfinished(tmp_path):
    write_block(tmp_path, "table5", "joint", seeds=(0, 1))
    write_run(tmp_path, table="table5", protocol="joint", row="tmpo", seed=2, method="tmpo")
    api = fake_api(tmp_path, states={"seed2": "crashed"})
    records = WandbRuns("me/tmpo", api=api).records()
    crashed = [r for r in records if not r.finished]
    assert len(crashed) == 1 and "wandb state is 'crashed'" in crashed[0].why_unfinished
    assert crashed[0].run_id == "wandb:me/tmpo/tmpo-seed2"
    with pytest.raises(ResultsError, match="unfinished run wandb:me/tmpo/tmpo-seed2"):
        build_tables(records, Options("mini"))


def test_wandb_path_must_name_entity_and_project():
    for bad in ("tmpo", "a/b/c", "/tmpo"):
        with pytest.raises(ValueError, match="must be <entity>/<project>"):
            WandbRuns(bad, api=FakeApi([]))
