"""A decoder language model through the real flow: a tiny random Llama exported with its KV cache,
quantized at each recipe, gated on perplexity and agreement with FP32, timed, priced per token,
promoted, and served as a text-generation model by `mlflow models serve`.

Real parts: Prefect's temporary server, MLflow on sqlite, Optimum's export, ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.lm_helpers import SENTENCES, tiny_llama_folder
from tests.servers import HOST, background, free_port, wait_until_answering

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def wikitext_like(path: Path, articles: int, seed: int) -> Path:
    """Articles in WikiText-2's layout (` = Title = ` headings, ` = = Section = = ` inside), from the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    lines = [""]
    for a in range(articles):
        lines += [f" = Article {a} = ", ""]
        for s in range(2):
            lines += [f" = = Part {s} = = ", ""]
            lines += [" " + " , ".join(rng.choice(SENTENCES) for _ in range(6)) + " . ", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def decoder_project(root: Path, model: Path, **sections) -> Path:
    """A project folder with params-lm.yaml's sections, pointed at `model` and small text, on sqlite."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params-lm.yaml").read_text())
    params["text_data"] = {"calibration_txt": str(wikitext_like(root / "valid.txt", 4, 1)),
                           "evaluation_txt": str(wikitext_like(root / "test.txt", 8, 2)),
                           "documents": 6, "calibration_documents": 2, "context_length": 48,
                           "min_document_tokens": 16}
    params["model"] = {"source_uri": str(model), "family": "auto", "onnx_opset": 18}
    params["generation"] = {"prompts": ["where is my refund", "I lost my card", "tell me a short story"],
                            "max_new_tokens": 6, "prompt_tokens": 24, "concurrency": 2, "timing_rounds": 5,
                            # the served measurement, kept short: a few steps of 1.5 s
                            "slo_p95_ms": 1000, "served_step_seconds": 1.5, "served_max_seconds": 12}
    params["quantize"]["max_parallel"] = 2
    params["quantize"]["candidates"] = [
        {"name": "fp32", "recipe": "fp32", "config": {}},
        {"name": "int8-dynamic", "recipe": "int8-dynamic", "config": {"per_channel": True, "graph": "plain"}},
        {"name": "int4-b32", "recipe": "int4-weight-only",
         "config": {"block_size": 32, "accuracy_level": 4, "quantize_embeddings": False}},
        {"name": "int4-b64-fp32acc", "recipe": "int4-weight-only",
         "config": {"block_size": 64, "accuracy_level": 0, "quantize_embeddings": False}},
    ]
    params["cost"]["measured_profile"] = "aws-c6a.large"
    params["cost"]["traffic"]["output_tokens_per_request"] = 8
    params["evaluate"] = {"intra_op_threads": 1}
    # A random model's next-token distributions are nearly flat, so quantization flips many argmaxes:
    # the bar is loose here; what is tested is the path, and that a strict bar is enforced.
    params["lm_quality_bar"] = {"max_relative_perplexity_increase": 0.5, "min_token_agreement": 0.0,
                                "max_mean_kl": 1.0, "min_greedy_agreement": 0.0}
    params["registry"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts"),
                          "experiment": "requant-lm", "serving_model_name": "tiny-lm-serving"}
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def decided(tmp_path_factory, tiny_llama, prefect_server):
    from flows.requantize import requantize

    params = decoder_project(tmp_path_factory.mktemp("lm-project"), tiny_llama)
    return params, requantize(params_path=str(params))


def test_a_tiny_llama_is_requantized_gated_on_agreement_and_promoted(decided):
    params, summary = decided
    decision = summary.decision
    assert decision["task"] == "text-generation"
    candidates = decision["candidates"]
    # The grid, plus the search's first trial: INT8 weight-only everywhere passes the loose bar, so no
    # block is ranked (a trial that keeps blocks in FP32 could only be slower).
    assert set(candidates) == {"fp32", "int8-dynamic", "int4-b32", "int4-b64-fp32acc", "search-keep-fp32-k0"}
    assert decision["search"]["best_k"] == 0 and not decision["search"]["sensitivity_computed"]
    fp32 = candidates["fp32"]["metrics"]
    # FP32 against itself: the same tokens, the same distribution.
    assert fp32["lm_token_agreement"] == 1.0 and fp32["lm_relative_perplexity_increase"] == pytest.approx(0, abs=1e-9)
    assert fp32["lm_mean_kl"] == pytest.approx(0, abs=1e-6)
    for name in ("int8-dynamic", "int4-b32"):
        metrics = candidates[name]["metrics"]
        assert 0 < metrics["lm_token_agreement"] <= 1 and metrics["lm_mean_kl"] >= 0
        assert metrics["size_ratio_vs_fp32"] < 1
    # Timed and priced per token: time to first token, decode speed at 1 and at the concurrency.
    for name, c in candidates.items():
        if c["passed_bar"]:
            m = c["metrics"]
            assert m["ttft_ms"] > 0 and m["decode_tokens_per_s_batch1"] > 0 and m["decode_tokens_per_s_concurrent"] > 0
            assert m["monthly_cost_usd"] > 0 and m["usd_per_million_output_tokens"] > 0
    assert summary.outcome == "promoted" and summary.winner in candidates
    assert decision["fp32_export_check"]["next_token_agreement"] == 1.0
    assert "tok/s @1" in summary.table and summary.winner in summary.table
    # Priced where the bill is paid: the winner and FP32 generated behind the served front under load, each
    # request the traffic's 8 tokens; every other timed candidate through a served model's ratio.
    served = decision["served"]
    assert {summary.winner, "fp32"} <= set(served)
    traffic = yaml.safe_load(Path(params).read_text())["cost"]["traffic"]
    for name, capacity in served.items():
        assert capacity["error"] is None and capacity["capacity_rps"] > 0
        priced = candidates[name]
        assert priced["priced_from"]["basis"] == "served"
        m = priced["metrics"]
        assert m["priced_requests_per_s"] == pytest.approx(capacity["capacity_rps"])
        assert m["inprocess_requests_per_s"] > 0 and m["inprocess_monthly_cost_usd"] > 0
        tokens_per_s = capacity["capacity_rps"] * traffic["output_tokens_per_request"]
        assert m["usd_per_million_output_tokens"] == pytest.approx(0.0765 / (tokens_per_s * 3600) * 1e6, rel=1e-3)
    for name, c in candidates.items():
        if name not in served and "ttft_ms" in c["metrics"]:
            assert c["priced_from"]["basis"] == "served-ratio" and c["priced_from"]["ratio_from"] in served
    assert "req/s priced" in summary.table
    # The parent run holds the decision as requant report reads it, and the version is tagged with its price.
    from mlflow import MlflowClient

    client = MlflowClient(yaml.safe_load(Path(params).read_text())["registry"]["tracking_uri"])
    markdown = Path(client.download_artifacts(summary.parent_run_id, "decision.md")).read_text()
    assert summary.winner in markdown and "per million generated tokens" in markdown
    version = client.get_model_version_by_alias("tiny-lm-serving", "production")
    assert float(version.tags["requant.usd_per_million_tokens"]) > 0 and version.tags["requant.task"] == "text-generation"


def test_a_strict_bar_fails_the_candidates_that_flip_tokens_and_the_search_keeps_blocks_in_fp32(tmp_path, tiny_llama,
                                                                                               prefect_server):
    from flows.requantize import requantize

    int4 = {"block_size": 32, "accuracy_level": 4, "quantize_embeddings": False}
    # INT4 everywhere flips about a quarter of the random model's next tokens: below the 80% bar. The search starts
    # from the same config (k = 0 is the int4-b32 candidate itself) and keeps the most sensitive blocks in FP32.
    params = decoder_project(tmp_path, tiny_llama, lm_quality_bar={"min_token_agreement": 0.80},
                             search={"decoder_recipe": "int4-weight-only", "decoder_base_config": int4},
                             serving={"price_from": "batched"},
                             quantize={"candidates": [{"name": "fp32", "recipe": "fp32", "config": {}},
                                                      {"name": "int4-b32", "recipe": "int4-weight-only", "config": int4}]})
    summary = requantize(params_path=str(params))
    candidates = summary.decision["candidates"]
    flipped = candidates["int4-b32"]
    assert flipped["metrics"]["lm_token_agreement_low"] < 0.80
    assert not flipped["passed_bar"] and "agreement" in flipped["reason"]
    search = summary.decision["search"]
    assert search["recipe"] == "int4-weight-only" and search["sensitivity_computed"]
    trials = {t["k"]: t for t in search["trials"]}
    assert trials[0]["candidate"] == "int4-b32" and not trials[0]["passed"]  # reused, not rebuilt
    best = search["best_k"]
    assert best is not None and trials[best]["passed"] and all(not trials[k]["passed"] for k in trials if k < best)
    assert len(search["kept_fp32"]) == best and set(search["kept_fp32"]) <= {"layer.0", "layer.1", "head"}
    kept = candidates[search["best_candidate"]]
    assert kept["passed_bar"] and kept["metrics"]["lm_token_agreement_low"] >= 0.80
    assert kept["metrics"]["size_ratio_vs_fp32"] < 1  # some blocks are still INT4
    assert summary.winner in {"fp32", search["best_candidate"]}
    from mlflow import MlflowClient

    client = MlflowClient(yaml.safe_load(Path(params).read_text())["registry"]["tracking_uri"])
    ranking = json.loads(Path(client.download_artifacts(summary.parent_run_id, "sensitivity.json")).read_text())["ranking"]
    assert {g["group"] for g in ranking} == {"layer.0", "layer.1", "head"}
    assert all(len(g["nodes"]) >= 1 and g["kl_divergence"] >= 0 for g in ranking)
    assert [g["group"] for g in ranking[:best]] == search["kept_fp32"]  # the most sensitive first


def test_the_promoted_decoder_generates_under_mlflow_models_serve(decided, tmp_path):
    params, summary = decided
    settings = yaml.safe_load(Path(params).read_text())
    port = free_port()
    # mlflow execs `uvicorn` by name: the venv's bin must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": settings["registry"]["tracking_uri"], "HF_HUB_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    command = [mlflow, "models", "serve", "-m", "models:/tiny-lm-serving@production", "--env-manager", "local",
               "-h", HOST, "-p", str(port), "-w", "1"]
    with background(command, env=env, log_path=tmp_path / "serve.log") as process:
        wait_until_answering(f"http://{HOST}:{port}/ping", process, tmp_path / "serve.log", timeout_s=180)
        body = json.dumps({"inputs": ["where is my refund", "I lost my card"], "params": {"max_new_tokens": 4}})
        request = urllib.request.Request(f"http://{HOST}:{port}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)


def test_requant_loadtest_measures_the_promoted_decoders_served_tokens(decided, tmp_path):
    from mlflow import MlflowClient

    from flows.after_decision import loadtest_version

    params, summary = decided
    sample = tmp_path / "prompts.csv"  # --sample: a CSV with a `text` column (params-lm.yaml has no `data` section)
    sample.write_text("text\n" + "\n".join(["where is my refund", "I lost my card", "what is my balance"]) + "\n")
    done = loadtest_version(str(params), "production", sample=str(sample), overrides={"max_seconds": 20})
    result = done.result
    # Each request is one prompt generating the traffic's 8 tokens; the ramp found a rate that held the p95 target.
    assert result.capacity_rps > 0 and result.slo_p95_ms == 1000 and result.limit_found
    assert result.p95_ms_at_capacity <= 1000
    assert f"served output tokens/s: {result.capacity_rps * 8:.1f}" in done.report
    # Compared with the figure the decision priced the version on (its own served measurement).
    priced = summary.decision["candidates"][summary.winner]["metrics"]["priced_requests_per_s"]
    assert done.comparison.assumed_sentences_per_s == pytest.approx(priced)
    client = MlflowClient(yaml.safe_load(Path(params).read_text())["registry"]["tracking_uri"])
    version = client.get_model_version_by_alias("tiny-lm-serving", "production")
    assert float(version.tags["requant.loadtest_capacity_rps"]) == pytest.approx(result.capacity_rps, abs=0.01)


def test_the_front_serves_a_decoder_version_and_counts_its_tokens(decided, tmp_path):
    from flows.after_decision import served_version_files
    from tasks.serve.front import served_front

    params, _ = decided
    files, version = served_version_files(str(params), "production", tmp_path)
    assert files.kind == "generator"
    with served_front(files) as (url, _pid):
        body = json.dumps({"inputs": ["where is my refund", "I lost my card"],
                           "params": {"max_new_tokens": 5, "ignore_eos": True}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = json.loads(answer.read())["predictions"]
        with urllib.request.urlopen(f"{url}/stats", timeout=10) as answer:
            stats = json.loads(answer.read())
        bad = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": ["hi"], "params": {
            "max_new_tokens": 10_000}}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
    assert stats["prompts"] == 2 and stats["generated_tokens"] == 10
    assert refused.value.code == 400 and "max_new_tokens is 10000" in json.loads(refused.value.read())["message"]


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing moved
def _without_chat_template(folder: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


def _with_remote_code(folder: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _empty_text(root: Path) -> dict:
    (root / "empty.txt").write_text("\n\n")
    return {"text_data": {"evaluation_txt": str(root / "empty.txt")}}


BAD_DECODER_INPUTS = {
    "classifier data for a language model": (None, lambda root: {"text_data": None, "data": {
        "train_csv": str(root / "train.csv"), "test_csv": str(root / "test.csv")}}, ["text_data"]),
    "no chat template where one is required": (_without_chat_template, lambda root: {}, ["chat template"]),
    "a context over the model's": (None, lambda root: {"text_data": {"context_length": 4096}}, ["context_length", "256"]),
    "empty evaluation text": (None, _empty_text, ["empty.txt"]),
    "weights that need remote code": (_with_remote_code, lambda root: {}, ["trust_remote_code"]),
}


@pytest.mark.parametrize("case", list(BAD_DECODER_INPUTS))
def test_bad_decoder_input_is_one_line_exit_2_and_moves_nothing(case, tmp_path, tiny_llama):
    from tests.cli_helpers import assert_one_clear_error, requant

    prepare_model, sections, fragments = BAD_DECODER_INPUTS[case]
    model = prepare_model(tiny_llama, tmp_path / "model") if prepare_model else tiny_llama
    params_path = decoder_project(tmp_path / "project", model)
    params = yaml.safe_load(params_path.read_text())
    for name, values in sections(tmp_path / "project").items():
        params[name] = None if values is None else {**(params.get(name) or {}), **values}
    if params.get("text_data") is None:
        params.pop("text_data")
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    done, errors = requant("run", "--params", str(params_path), timeout=600)
    assert_one_clear_error(done, errors, *fragments)
    from mlflow import MlflowClient

    client = MlflowClient(params["registry"]["tracking_uri"])
    assert not client.search_registered_models(), "nothing is registered by a refused run"


def test_a_classifier_given_only_text_data_is_refused(tmp_path, tiny_model_folder):
    from tests.cli_helpers import assert_one_clear_error, requant

    params_path = decoder_project(tmp_path / "project", tiny_model_folder)
    done, errors = requant("run", "--params", str(params_path), timeout=600)
    assert_one_clear_error(done, errors, "classifier", "data")


# Last of the tests on `decided`: it may move production.
def test_a_rerun_serves_production_from_its_own_registry_files(decided):
    from flows.requantize import requantize

    params, first = decided
    summary = requantize(params_path=str(params), force=True)
    production = f"production-v{first.promoted_version}"
    # Production is measured like any candidate, and served from its download (graph, tokenizer, card).
    assert production in summary.decision["candidates"] and production in summary.decision["served"]
    served = summary.decision["served"][production]
    assert served["error"] is None and served["capacity_rps"] > 0
    assert summary.decision["candidates"][production]["priced_from"]["basis"] == "served"
