"""Every price is a served price: the rule (pure) and the real flow (tiny model, served on 127.0.0.1)."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tasks.config.settings import HardwareProfile, TrafficSettings
from tasks.measure.served_pricing import (
    BATCHED,
    RATIO,
    SERVED,
    ServedCapacity,
    price_all,
)
from tests.conftest import tiny_project

PROFILE = HardwareProfile(name="box", usd_per_hour=0.1)
TRAFFIC = TrafficSettings(requests_per_month=1e9, peak_requests_per_second=1000)


def capacity(rps: float, high: float | None = None) -> ServedCapacity:
    return ServedCapacity(rps, high, 1, 50.0, True, 20.0, 150.0, 6, 12.0)


def test_load_tested_candidates_are_priced_on_their_served_capacity_the_rest_through_the_nearest_ratio():
    batched = {"fp32": 120.0, "int8": 330.0, "int8-b": 300.0, "int4": 125.0}
    served = {"fp32": capacity(100.0, 108.0), "int8": capacity(240.0, 260.0)}
    priced = price_all(batched, served, PROFILE, TRAFFIC)

    assert priced["fp32"][0].basis == SERVED and priced["fp32"][0].sentences_per_s == 100.0
    assert priced["fp32"][1].instances == 10  # ceil(1000 / 100)
    assert priced["int8"][0].ratio == pytest.approx(240 / 330)
    # int8-b (300/s) is nearer INT8 (330/s) than FP32 (120/s): it borrows INT8's served/batched ratio.
    assert priced["int8-b"][0].basis == RATIO and priced["int8-b"][0].ratio_from == "int8"
    assert priced["int8-b"][0].sentences_per_s == pytest.approx(300 * 240 / 330)
    assert priced["int4"][0].ratio_from == "fp32"
    assert "served via ratio" in priced["int4"][0].describe() and "load test" in priced["fp32"][0].describe()
    # The served price, not the batched one: FP32 at 100/s needs more instances than at 120/s.
    assert priced["fp32"][1].monthly_cost_usd > price_all(batched, {}, PROFILE, TRAFFIC)["fp32"][1].monthly_cost_usd


def test_without_any_served_figure_prices_stay_batched_and_say_so():
    failed = ServedCapacity(0.0, None, 1, None, False, None, None, 0, 0.0, error="the front did not start")
    priced = price_all({"fp32": 120.0, "int8": 330.0}, {"fp32": failed}, PROFILE, TRAFFIC)
    assert {price.basis for price, _ in priced.values()} == {BATCHED}
    assert priced["fp32"][0].sentences_per_s == 120.0


@pytest.mark.e2e
def test_flow_prices_winner_production_and_fp32_from_served_capacity_and_a_broken_production_is_replaced(
        tmp_path, tiny_model_folder, prefect_server):
    from flows.requantize import requantize
    from tasks.config.loading import load_settings
    from tasks.track import TAG_PRODUCTION_BROKEN, Tracker

    project = tiny_project(tmp_path, tiny_model_folder,
                           serving={"price_from": "served", "step_seconds": 1, "max_seconds": 12},
                           loadtest={"warmup_requests": 5, "max_connections": 64})
    params = str(project / "params.yaml")

    def run(work: str):
        return requantize(params_path=params, model_uri=str(tiny_model_folder), work_dir=str(tmp_path / work),
                          force=True)

    first = run("work")
    assert first.outcome == "promoted"
    second = run("work")  # now there is a production version to serve as well
    decision = second.decision
    served = decision["pricing"]["served"]
    production = f"production-v{first.promoted_version}"
    assert {decision["winner"], production, "fp32"} <= set(served)
    for name in (decision["winner"], production, "fp32"):
        assert served[name]["error"] is None and served[name]["capacity_rps"] > 0
        assert served[name]["generator_cpu_percent"] is not None and served[name]["steps"] >= 1
        record = decision["candidates"][name]
        assert record["priced_from"]["basis"] == "served"
        assert record["served_load_tested"] == 1.0
        assert record["priced_sentences_per_s"] == pytest.approx(served[name]["sentences_per_s"])
        assert record["monthly_cost_usd"] > 0 and record["batched_cost"]["monthly_cost_usd"] > 0
    # Every priced candidate says which figure its price comes from; savings are priced against FP32.
    assert all(c["priced_from"]["basis"] in ("served", "served-ratio") for c in decision["candidates"].values()
               if c.get("monthly_cost_usd"))
    analysis = decision["cost_analysis"]
    assert analysis["fp32_monthly_usd"] is not None and analysis["fp32_basis"] == "served"
    assert "served capacity" in analysis["priced_from"]
    assert "served/s" in second.table and "(load)" in second.table

    # The production version's artifacts vanish from the store: the next run says so, records it and
    # promotes the winner instead of keeping a production that cannot be served.
    tracker = Tracker(load_settings(params).registry)
    version = tracker.production()
    uri = tracker.client.get_model_version_download_uri(tracker.settings.serving_model_name, version.version)
    shutil.rmtree(Path(urlparse(uri).path))
    third = run("work")
    assert third.decision["production_broken"] and f"production version {version.version} is broken" in \
        third.decision["production_broken"]
    assert third.outcome == "promoted" and third.promoted_version != str(version.version)
    tags = tracker.client.get_run(third.parent_run_id).data.tags
    assert "is broken" in tags[TAG_PRODUCTION_BROKEN]
    assert str(tracker.production().version) == third.promoted_version
