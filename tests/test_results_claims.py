"""The paper's claims checked on our tables (tmpo.results.claims): the comparison rule on hand values, the
deciding comparison and verdict on the hand-made suite of tests/synthetic_runs.py, and claims.md."""

from __future__ import annotations

import math

import pytest

from synthetic_runs import BASE, write_mini_suite
from tmpo.results.aggregate import Options, build_tables
from tmpo.results.claims import CLAIMS, check_claims, compare, paper_bar_shares, to_markdown, verdict
from tmpo.results.layout import TABLES
from tmpo.results.runs import LocalRuns


def test_compare_takes_twice_the_larger_seed_sd_and_the_base_has_none():
    d, bar = compare((1.0, 0.1, 3), (0.7, 0.05, 3), higher_is_better=True)
    assert d == pytest.approx(0.3) and bar == pytest.approx(0.2)
    assert verdict(d, bar, better=True) == "holds" and verdict(d, bar, better=False) == "fails"
    d, bar = compare((1.0, 0.1, 3), (0.7, 0.05, 3), higher_is_better=False)  # e.g. iteration time
    assert d == pytest.approx(-0.3) and verdict(d, bar, better=True) == "fails"
    d, bar = compare((1.0, 0.1, 3), (0.9, 0.0, 1), higher_is_better=True, other_is_base=True)
    assert d == pytest.approx(0.1) and bar == pytest.approx(0.2) and verdict(d, bar, True) == "within spread"
    _, bar = compare((1.0, 0.1, 3), (0.7, math.nan, 1), higher_is_better=True)  # a trained row with one seed
    assert math.isnan(bar) and verdict(0.3, bar, True) == "pending: < 2 seeds"
    assert verdict(math.nan, math.nan, True) == "pending: no runs"


def test_paper_bar_is_the_flux_base_spread_over_its_mean():
    shares = paper_bar_shares()
    # PickScore of FLUX.1-dev's base in Table 1's three blocks and Table 5: 22.301, 21.968, 22.604, 22.604
    assert shares["pickscore"] == pytest.approx((22.604 - 21.968) / ((22.301 + 21.968 + 22.604 + 22.604) / 4))
    assert shares["hpsv21"] == pytest.approx((0.310 - 0.292) / ((0.301 + 0.292 + 0.310 + 0.310) / 4))


@pytest.fixture
def claims(tmp_path):
    write_mini_suite(tmp_path)
    return check_claims(build_tables(LocalRuns(tmp_path).records(), Options("mini")))


def pick(claims, text_start, table, protocol, metric, row):
    sel = claims[claims.claim.str.startswith(text_start) & (claims.table == table) & (claims.protocol == protocol)
                 & (claims.metric == metric) & (claims.row == row)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_verdicts_on_the_synthetic_suite(claims):
    # row i of a block: metric mean 0.6 + 0.1 i, sd 0.1; time mean 2 + i, sd 1 (TMPO is i = 4, GARDO 3)
    line = pick(claims, "TMPO achieves the best compositional", "table1", "geneval", "geneval", "tmpo")
    assert (line.against, line.row_value, line.row_seeds) == ("gardo", pytest.approx(1.0), 3)  # the runner-up
    assert line.d == pytest.approx(0.1) and line.seed_bar == pytest.approx(0.2) and line.verdict == "within spread"
    # TMPO is the slowest here: 6 s vs Flow-GRPO's 2 s; the largest deficit decides
    line = pick(claims, "TMPO has the best iteration time", "table1", "ocr", "time_s", "tmpo")
    assert (line.against, line.d, line.seed_bar, line.verdict) == ("flow_grpo", pytest.approx(-4.0), pytest.approx(2.0),
                                                                  "fails")
    # Flow-GRPO's LGMD 0.6 is far above the base's -0.633: "below the base" fails
    line = pick(claims, "GRPO-style baselines", "table5", "joint", "lgmd", "flow_grpo")
    assert line.against == "base" and line.d == pytest.approx(0.6 - BASE["lgmd"]) and line.verdict == "fails"
    # Table 2: beta = 1 (0.6) below TMPO (Full), read from Table 1's PickScore TMPO (1.0): holds
    line = pick(claims, "Fixed beta = 1", "table2", "pickscore", "pickscore", "beta1")
    assert line.against == "full" and line.d == pytest.approx(-0.4) and line.verdict == "holds"
    # the paper bar: its share times our base's score (Table 2 uses Table 1's PickScore block's base)
    assert line.paper_bar == pytest.approx(paper_bar_shares()["pickscore"] * BASE["pickscore"])
    assert math.isnan(pick(claims, "TMPO has the best LGMD", "table6", "pickscore", "lgmd", "tmpo").paper_bar)


def test_rows_without_runs_leave_the_claim_pending(tmp_path):
    write_mini_suite(tmp_path)
    tables = build_tables(LocalRuns(tmp_path).records(), Options("mini"), names=["table1"])  # no Tables 2, 5, 6
    claims = check_claims(tables)
    assert set(claims[claims.table != "table1"].verdict) == {"pending: no runs"}
    # every claim names real rows and metrics of its table
    for claim in CLAIMS:
        for table, protocol in claim.settings:
            spec = TABLES[table]
            keys = {r.key for r in spec.block(protocol).rows} | {"base"}
            assert set(claim.subjects) <= keys and (claim.against == "others" or set(claim.against) <= keys)
            assert set(claim.metrics) <= {c.metric for c in spec.columns}


def test_markdown_counts_every_verdict_and_prints_each_claim(claims):
    md = to_markdown(claims, "mini", "somewhere")
    counts = claims.verdict.value_counts()
    assert f"{counts.get('holds', 0)} holds, {counts.get('within spread', 0)} within spread, " \
           f"{counts.get('fails', 0)} fails" in md
    assert md.count("\n## ") == len(CLAIMS)
    assert "| table1/geneval | geneval | tmpo | 1.000 (3) | gardo | +0.100 | 0.200 | — | within spread |" in md
