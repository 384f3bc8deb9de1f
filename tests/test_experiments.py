"""Experiment configs (conf/experiment/**): every block composes and validates for every row it sweeps,
carries the paper's per-protocol settings (App. D.4/D.5) and its labels, and the rows the tables
aggregator reads across blocks (Table 2's full row, Table 6) are the same configs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from experiments.run_suite import BLOCKS, block_jobs
from tmpo.config import to_container, validate_targets
from tmpo.results.layout import ABLATION_ROWS, METHOD_ROWS, TABLES
from tmpo.resume import flatten
from tmpo.run import CONF_DIR, compose_config

CONF = Path(__file__).resolve().parent.parent / "conf" / "experiment"
ALL_BLOCKS = BLOCKS["paper"] + BLOCKS["mini"]
ROW_SPECS = {r.key: r for r in (*METHOD_ROWS, *ABLATION_ROWS[1:])}


@lru_cache(maxsize=None)
def _compose(block: str, row: str | None = None, *extra: str) -> dict:
    cfg = compose_config([f"experiment={block}", "run_dir=.", *([f"experiment/row={row}"] if row else []), *extra])
    validate_targets(cfg)
    return to_container(cfg)


def _sweep(block: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={block}", "run_dir=."], return_hydra_config=True)
        return dict(cfg.hydra.sweeper.params)


@pytest.fixture(scope="module")
def compose():
    """compose(block, row=None, *extra) -> the resolved, validated run config (cached: read, never modify);
    ``compose.sweeps[block]`` = the block's ``hydra.sweeper.params``."""
    _compose.sweeps = {b: _sweep(b) for b in ALL_BLOCKS}
    return _compose


def test_every_block_composes_and_validates_for_every_row_with_its_labels(compose):
    for block in ALL_BLOCKS:
        scale = "mini" if block.startswith("mini/") else "paper"
        table = block.split("/")[-1].split("_")[0]
        rows = compose.sweeps[block]["experiment/row"].split(",")
        for row in rows:
            cfg = compose(block, row)
            tags = cfg["tags"]
            assert (tags["scale"], tags["table"], tags["row"], tags["experiment"]) == (scale, table, row, block)
            assert tags["protocol"] in {b.protocol for b in TABLES[table].blocks}
            spec = ROW_SPECS[row]  # the aggregator's expectation for this row = what the config runs
            assert (cfg["method"], cfg["ablation"]) == (spec.method, spec.ablation), (block, row)
        table_rows = {r.key for b in TABLES[table].blocks for r in b.rows if not r.source}
        assert set(rows) == table_rows, block
        assert compose.sweeps[block]["trainer.seed"] == ("0,1,2" if scale == "mini" else "0")


def test_block_jobs_are_rows_times_seeds_in_fixed_run_dirs():
    ocr = block_jobs("mini/table1_ocr", Path("/r"), Path("/res"))
    assert len(ocr) == 15 and [j.seed for j in ocr if j.row == "gardo"] == [0, 1, 2]
    assert [j.first_seed for j in ocr if j.row == "gardo"] == [True, False, False]
    gardo1 = next(j for j in ocr if j.row == "gardo" and j.seed == 1)
    assert (gardo1.method, gardo1.protocol, gardo1.model, gardo1.total_steps) == ("gardo", "ocr", "mini", 75)
    assert gardo1.run_dir == Path("/r/mini/table1_ocr/gardo/seed1")
    assert gardo1.record_dir == Path("/res/mini/records/table1_ocr/gardo/seed1")
    table2 = block_jobs("mini/table2_ablation")
    assert len(table2) == 12 and {j.ablation for j in table2} == {"beta1", "detailed_balance", "no_tree", "fixed_branching"}


def test_paper_blocks_carry_app_d4_and_d5(compose):
    steps = {"table1_geneval": 1000, "table1_ocr": 250, "table1_pickscore": 500, "table2_ablation": 500,
             "table5_joint": 500, "table6_sd35": 500}
    warmup = {"table1_ocr": 100}
    for block in BLOCKS["paper"]:
        tmpo = compose(block, "beta1" if block == "table2_ablation" else "tmpo")
        assert tmpo["trainer"]["total_steps"] == steps[block] and tmpo["trainer"]["prompts_per_step"] == 8
        assert tmpo["objective"]["beta_warmup_steps"] == warmup.get(block, 150)
        if "pickscore" in block or block in ("table2_ablation", "table6_sd35"):
            for row in ("tmpo", "flow_grpo") if block != "table2_ablation" else ("detailed_balance", "no_tree"):
                cfg = compose(block, row)
                assert (cfg["trainer"]["lr"], cfg["trainer"]["grad_clip"]) == (5e-5, 0.3), (block, row)
        else:  # TMPO: lr 3e-5, clip 0.5; baselines: lr 5e-5, clip 0.3 (the method configs' values)
            assert (tmpo["trainer"]["lr"], tmpo["trainer"]["grad_clip"]) == (3e-5, 0.5)
            gardo = compose(block, "gardo")
            assert (gardo["trainer"]["lr"], gardo["trainer"]["grad_clip"]) == (5e-5, 0.3)
    assert compose("table1_ocr", "tmpo")["reward"]["fn"]["reader"]["_target_"] == "tmpo.rewards.real_ocr.RapidOCRReader"
    assert compose("table1_geneval", "tmpo")["model"]["_target_"] == "tmpo.policies.flux.FluxPolicy"
    assert compose("table6_sd35", "tmpo")["model"]["_target_"] == "tmpo.policies.sd3.SD3Policy"


def test_mini_blocks_scale_iterations_and_warm_up_and_checkpoint_every_iteration(compose):
    # warm-up = the paper's share of the run: GenEval 15%, OCR 40%, PickScore/Joint 30%
    expected = {"mini/table1_geneval": (300, 45), "mini/table1_ocr": (75, 30), "mini/table1_pickscore": (120, 36),
                "mini/table2_ablation": (120, 36), "mini/table5_joint": (120, 36), "mini/table6_sd35": (120, 36)}
    for block, (steps, warm) in expected.items():
        cfg = compose(block, "detailed_balance" if "table2" in block else "tmpo")
        assert (cfg["trainer"]["total_steps"], cfg["objective"]["beta_warmup_steps"]) == (steps, warm), block
        assert cfg["trainer"]["threads"] == 1 and cfg["trainer"]["checkpoint_every"] == 1
        assert cfg["trainer"]["prompts_per_step"] == 4 and cfg["eval"]["samples_per_prompt"] == 10
        flow = compose(block, "no_tree" if "table2" in block else "flow_grpo")
        for c in (cfg, flow):  # the paper's lr x the method's mini factor
            assert c["trainer"]["lr_scale"] == c["lr_scales"][c["method"]]
        if any(b in block for b in ("geneval", "ocr", "joint")):  # D.4/D.5: TMPO 3e-5, baselines 5e-5
            assert (cfg["trainer"]["lr"], flow["trainer"]["lr"]) == (3e-5, 5e-5)
        else:  # PickScore blocks: 5e-5 for every row
            assert flow["trainer"]["lr"] == cfg["trainer"]["lr"] == 5e-5
    assert compose("mini/table1_pickscore", "mixgrpo")["trainer"]["grad_clip"] == 0.3
    assert compose("mini/table1_geneval", "tmpo")["trainer"]["grad_clip"] == 0.5
    assert compose("mini/table1_pickscore", "tmpo")["eval"]["max_prompts"] == 10
    assert compose("mini/table1_geneval", "tmpo")["eval"]["max_prompts"] is None  # every GenEval test prompt
    assert compose("mini/table6_sd35", "tmpo")["model"]["arch"] == "mmdit"
    assert compose("mini/table1_pickscore", "tmpo")["model"]["arch"] == "dit"


@pytest.mark.parametrize("scale", ["", "mini/"])
def test_rows_shared_across_blocks_are_the_same_config(compose, scale):
    """Table 2's 'TMPO (Full)' is Table 1 PickScore's TMPO row; Table 6 is that block on another model."""
    def settings(block, row, *extra):
        flat = flatten(compose(f"{scale}{block}", row, *extra))
        return {k: v for k, v in flat.items() if not k.startswith("tags.") and k != "run_dir"}

    pick = settings("table1_pickscore", "tmpo")
    assert settings("table2_ablation", "tmpo") == pick
    model = "model=mini_mmdit" if scale else "model=sd35_medium"
    assert settings("table6_sd35", "tmpo") == settings("table1_pickscore", "tmpo", model)


def test_every_row_config_is_used_and_every_block_is_known():
    rows = {p.stem for p in (CONF / "row").glob("*.yaml")}
    assert rows == set(ROW_SPECS)
    blocks = {str(p.relative_to(CONF).with_suffix("")) for p in CONF.rglob("table*.yaml")}
    assert blocks == set(ALL_BLOCKS)


def test_mini_lr_factor_per_method_follows_its_committed_pilot(compose):
    from experiments.mini_lr_pilot import FACTORS, METHODS, chosen_factor, configured_factors, pilot_points

    methods = {p.stem for p in (CONF.parent / "method").glob("*.yaml")}
    configured = configured_factors()
    assert set(configured) == methods  # a new method needs its factor (start-up says so otherwise)
    assert set(configured.values()) <= set(FACTORS)
    for method in METHODS:
        cfg = compose("mini/table1_geneval", method)
        assert cfg["trainer"]["lr_scale"] == configured[method]
        assert cfg["trainer"]["lr"] == (3e-5 if method == "tmpo" else 5e-5)  # D.4/D.5, unscaled
    points = pilot_points()
    assert points["mixgrpo"][10.0]["geneval"] < points["mixgrpo"][1.0]["geneval"]  # the collapse that split the factor
    for method, p in points.items():
        pick = chosen_factor(p)
        if pick is not None:
            assert configured[method] == pick, method
    # variants follow their method: the Table 2 rows are TMPO, gardo_code is GARDO
    assert configured["tmpo_marginal"] == configured["grpo"] == configured["tmpo"]
    assert configured["gardo_code"] == configured["gardo"]
