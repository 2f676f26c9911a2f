"""The model registry: source models registered and fetched, serving versions registered, aliases
moved (promotion, challenger, rollback) and the records each move leaves on the versions."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.core import interrupts
from tasks.core.errors import ModelSourceError, RequantError
from tasks.core.hashing import folder_digest, sha256_of
from tasks.core.locking import exclusive
from tasks.track.connection import Connection, version_behind_alias
from tasks.track.runs import (
    GENERATION_EXAMPLE,
    SERVING_EXAMPLE,
    lineage_tags,
    process_identity,
)
from tasks.track.services import is_not_found
from tasks.track.tags import (
    TAG_ACCURACY,
    TAG_CONFIG_HASH,
    TAG_FAILURE,
    TAG_KEY,
    TAG_KIND,
    TAG_MODEL_SHA256,
    TAG_PREVIOUS_PRODUCTION,
    TAG_PROCESS,
    TAG_ROLLBACK_REASON,
    TAG_ROLLBACK_RUN,
    TAG_ROLLED_BACK_AT,
    TAG_ROLLED_BACK_BY,
    TAG_ROLLED_BACK_TO,
)

TRANSFORMERS_REQUIREMENTS = ["torch==2.13.0", "transformers==4.57.6", "tokenizers==0.22.2", "safetensors"]

log = logging.getLogger("requant")


@dataclass(frozen=True)
class ProductionVersion:
    """The version behind the production alias, downloaded so it can be measured in this run."""

    version: str
    tags: dict[str, str]
    model_path: Path  # its ONNX graph
    model_dir: Path | None = None  # the downloaded served model (None: a plain ONNX version, not text-in)


class ProductionBroken(RequantError):
    """The version behind the production alias does not load from the registry as the served model."""

    def __init__(self, version: str, why: str) -> None:
        super().__init__(f"production version {version} is broken: {why}")
        self.version, self.why = version, why


def _check_served_model(model_dir: Path, version: str) -> None:
    """Load a downloaded serving model as it is served and have it answer: two texts classified, or
    one prompt answered by a text-generation model.

    Raises:
        ProductionBroken: it does not load, or does not answer one prediction per text.
    """
    from tasks.serve.front import (
        files_of_mlflow_model,
        generation_files_of_mlflow_model,
    )

    try:
        generation = generation_files_of_mlflow_model(model_dir)
        if generation is not None:
            from tasks.serve.generation import TextGenerator

            generator = TextGenerator(generation.onnx_model, generation.tokenizer, generation.card, threads=1)
            try:
                answers = generator.generate(GENERATION_EXAMPLE, max_new_tokens=2)
            finally:
                generator.close()
            expected = len(GENERATION_EXAMPLE)
        else:
            from tasks.serve.serving import TextClassifier

            files = files_of_mlflow_model(model_dir)
            classifier = TextClassifier(files.onnx_model, files.tokenizer, files.card, threads=1)
            try:
                answers = classifier.classify(SERVING_EXAMPLE)
            finally:
                classifier.batcher.close()
            expected = len(SERVING_EXAMPLE)
    except Exception as exc:
        raise ProductionBroken(version, f"it does not load as the served model ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0] if str(exc) else ''})"[:400]) from exc
    if len(answers) != expected:
        raise ProductionBroken(version, f"it answered {len(answers)} predictions for {expected} texts")


@dataclass(frozen=True)
class SourceModel:
    """The model version being requantized."""

    uri: str
    folder: Path
    name: str | None
    version: str | None
    digest: str


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """Split a registry URI into (name, version, alias); None for a local folder path.

    Only `models:/NAME/VERSION` and `models:/NAME@ALIAS` name a registered model version; other
    URI schemes (runs:/, s3://, ...) are refused, since requant needs a version to record lineage.

    Raises:
        ModelSourceError: a URI that is not one of the two registry forms.
    """
    fix = "use models:/NAME/VERSION, models:/NAME@ALIAS or a local model folder"
    if not uri.startswith("models:/"):
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/", uri)  # two letters or more: not a drive
        if scheme:
            raise ModelSourceError(f"model URI {uri} uses the {scheme.group(1)}: scheme, which requant does not read: "
                                   f"register the model and {fix}")
        return None
    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if name and alias and "/" not in name + alias:
            return name, None, alias
    else:
        name, _, version = ref.partition("/")
        if name and version.isdigit():
            return name, version, None
        if name and not version:
            raise ModelSourceError(f"model URI {uri} names no version: {fix}")
    raise ModelSourceError(f"model URI {uri} is not a registry URI requant reads: {fix}")


class Registry(Connection):
    """Registered models, their versions and aliases."""

    def describe_version(self, version: str, markdown: str) -> None:
        """Set a serving-model version's description."""
        self.client.update_model_version(self.settings.serving_model_name, version, description=markdown[:60000])

    def describe_serving_model(self, markdown: str) -> None:
        """Set the serving registered model's description."""
        self._ensure_registered_model(self.settings.serving_model_name)
        self.client.update_registered_model(self.settings.serving_model_name, description=markdown[:60000])

    def register_source(self, folder: Path, name: str, alias: str, run_name: str,
                        params: dict, metrics: dict[str, float]) -> str:
        """Log a model folder (safetensors + card) in a run and register it as a new version; return the version."""
        run = self.client.create_run(self.experiment_id(), run_name=run_name,
                                     tags={**lineage_tags("flows.train"), "requant.kind": "train",
                                           TAG_PROCESS: process_identity()})
        run_id = run.info.run_id
        try:
            self.log_params(run_id, params)
            self.log_metrics(run_id, metrics)
            self.client.log_artifacts(run_id, str(folder), "model")
            self._ensure_registered_model(name)
            version = self.client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                                       tags={TAG_ACCURACY: f"{metrics.get('test_accuracy', float('nan')):.6f}"})
            self.client.set_registered_model_alias(name, alias, version.version)
        except BaseException as exc:  # a train run never stays RUNNING after a failure
            self.client.set_tag(run_id, TAG_FAILURE, str(exc)[:5000])
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return str(version.version)

    def register_transformers(self, folder: Path, name: str, alias: str, run_name: str,
                              params: dict, metrics: dict[str, float]) -> str:
        """Log a Hugging Face classifier folder with MLflow's transformers flavor (a text-classification
        pipeline, safetensors weights) and register it as a new version under `alias`; return the version."""

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import (
            AutoModelForSequenceClassification,
            AutoTokenizer,
            pipeline,
        )

        model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        classifier = pipeline("text-classification", model=model,
                              tokenizer=AutoTokenizer.from_pretrained(str(folder), local_files_only=True), device="cpu")
        with self._mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name,
                                    tags={**lineage_tags("flows.train"), "requant.kind": "train",
                                          TAG_PROCESS: process_identity()}) as run:
            self.log_params(run.info.run_id, params)
            self.log_metrics(run.info.run_id, metrics)
            # pip_requirements given: inferring them costs ~17 s.
            info = self._mlflow.transformers.log_model(
                classifier, name="model", pip_requirements=TRANSFORMERS_REQUIREMENTS, input_example=SERVING_EXAMPLE)
        self._ensure_registered_model(name)
        version = self._mlflow.register_model(info.model_uri, name,
                                              tags={TAG_ACCURACY: f"{metrics.get('test_accuracy', float('nan')):.6f}"})
        self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def fetch_source(self, uri: str, dst: Path) -> SourceModel:
        """Materialise the model to requantize as a local folder.

        Raises:
            ModelSourceError: the registry has no such model/version/alias, or the path is missing.
        """
        # Any registered model family: requant's own folder, a Hugging Face folder, or an MLflow
        # transformers-flavor model (model/ + components/tokenizer/), downloaded as it was logged.
        from tasks.models.base import detect_family

        if parse_model_uri(uri) is None:
            folder = Path(uri).expanduser().resolve()
            detect_family(folder)
            return SourceModel(uri=uri, folder=folder, name=None, version=None, digest=folder_digest(folder))
        name, version = self.resolve_version(uri)
        dst.mkdir(parents=True, exist_ok=True)
        target = dst / f"{name}-v{version}"
        if not target.is_dir():
            partial = dst / f".{name}-v{version}.partial"
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(partial))
            partial.rename(target)
        detect_family(target)
        return SourceModel(uri=uri, folder=target, name=name, version=version, digest=folder_digest(target))

    def resolve_version(self, uri: str) -> tuple[str, str]:
        """(name, version) of the registered version a models:/ URI names.

        Raises:
            ModelSourceError: a malformed URI, or one naming a model, alias or version the registry
                does not have (the message lists what it has).
        """
        from mlflow.exceptions import MlflowException

        name, version, alias = parse_model_uri(uri)
        try:
            if alias:
                return name, str(self.client.get_model_version_by_alias(name, alias).version)
            return name, str(self.client.get_model_version(name, version).version)
        except MlflowException as exc:
            raise ModelSourceError(self._not_found(uri, name, version, alias)) from exc

    def _not_found(self, uri: str, name: str, version: str | None, alias: str | None) -> str:
        """Say which part of a model URI the registry does not know, and what it has instead."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException:
            return (f"model {uri} not found: the registry at {self.uri} has no model named '{name}'; "
                    "run `requant train` first or pass --model with an existing model")
        if alias:
            known = ", ".join(sorted(model.aliases)) or "none"
            return f"model {uri} not found: '{name}' has no alias '{alias}' (aliases: {known}); pass an existing alias or version"
        versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{name}'"))
        return (f"model {uri} not found: '{name}' has no version {version} (versions: "
                f"{', '.join(map(str, versions[-10:])) or 'none'}); pass an existing version")

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(name)
            except MlflowException:
                pass  # created concurrently

    def production(self):
        """The ModelVersion behind the production alias of the serving model, or None if the alias is unset."""
        return self.version_by_alias(self.settings.production_alias)

    def challenger(self):
        """The ModelVersion behind the challenger alias of the serving model, or None if the alias is unset."""
        return self.version_by_alias(self.settings.challenger_alias)

    def version_by_alias(self, alias: str):
        """The serving model's ModelVersion behind `alias`, or None if the alias (or the model) does not exist.

        Raises:
            ServiceUnavailable: the registry did not answer (never taken for "no version").
        """
        return version_behind_alias(self.client, self.settings.serving_model_name, alias)

    def serving_version(self, version: str):
        """The serving model's ModelVersion `version`.

        Raises:
            RequantError: the registry has no such version (the message lists the versions it has).
        """
        from mlflow.exceptions import MlflowException

        name = self.settings.serving_model_name
        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if not is_not_found(exc):
                raise
            known = sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{name}'"))
            raise RequantError(f"{name} has no version {version} (versions: {', '.join(map(str, known[-10:])) or 'none'}): "
                               "pass an existing version") from exc

    def download_version(self, version: str, dst: Path) -> Path:
        """Download a serving-model version (the whole MLflow model folder) into `dst`; return the folder.

        Raises:
            RequantError: the registry cannot give it.
        """
        try:
            return Path(self._mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.settings.serving_model_name}/{version}", dst_path=str(dst)))
        except Exception as exc:
            raise RequantError(f"cannot download version {version} of {self.settings.serving_model_name}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

    def fetch_production(self, dst: Path) -> ProductionVersion | None:
        """Download the production version from the registry and load it as it is served; return it.

        Downloaded anew on every run, never taken from an earlier run's copy: what is measured and
        kept must be what the registry serves today. A requant serving model (pyfunc with an ONNX
        graph, tokenizer and card) is loaded and answers two texts before it counts as loadable.

        Returns None when no version is behind the alias.

        Raises:
            ProductionBroken: the version behind the alias cannot be downloaded, holds no ONNX graph,
                does not match the sha256 it was registered with, or does not load and answer as served.
        """
        import shutil

        version = self.production()
        if version is None:
            return None
        name, number = self.settings.serving_model_name, str(version.version)
        target = Path(dst) / f"{name}-v{number}"
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{number}", dst_path=str(partial))
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise ProductionBroken(number, f"it cannot be downloaded from the registry "
                                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        graphs = sorted(target.rglob("*.onnx"), key=lambda p: (p.name != "model.onnx", -p.stat().st_size))
        if not graphs:
            raise ProductionBroken(number, "its artifacts hold no ONNX graph (move the alias to a version requant registered)")
        expected = version.tags.get(TAG_MODEL_SHA256)
        if expected:

            if sha256_of(graphs[0]) != expected:
                raise ProductionBroken(number, "its ONNX graph does not match the sha256 it was registered with")
        served = (target / "MLmodel").is_file() and "classifier_card" in (target / "MLmodel").read_text()
        if served:
            _check_served_model(target, number)
        return ProductionVersion(version=number, tags=dict(version.tags), model_path=graphs[0],
                                 model_dir=target if served else None)

    def register_winner(self, model_uri: str, tags: dict[str, str], lock_dir: Path,
                        broken: set[str] = frozenset()) -> str:
        """Register the winner as a version of the serving model, without moving any alias; return the version.

        A version already registered for the same decision key and the same graph (sha256) is reused,
        never duplicated (a rerun after an interrupted promotion finds it), unless it is one of the
        `broken` versions (it no longer loads from the registry): then the winner is registered anew.
        A forced rerun of the same decision that picks a different graph registers it as a new version.
        """
        name = self.settings.serving_model_name
        with exclusive(lock_dir, f"promote-{name}"):
            self._ensure_registered_model(name)
            existing = [v for v in self.client.search_model_versions(
                f"name = '{name}' and tags.`{TAG_KEY}` = '{tags[TAG_KEY]}'") if str(v.version) not in broken
                and v.tags.get(TAG_MODEL_SHA256) == tags.get(TAG_MODEL_SHA256)]
            version = existing[0] if existing else self._mlflow.register_model(model_uri, name, tags=tags)
        return str(version.version)

    def move_alias(self, version: str, lock_dir: Path, alias: str | None = None) -> None:
        """Move `alias` (default: the production alias) to `version` and check that it reads back.

        The last step of a promotion: the decision record is written before it, so an alias never
        points at a version whose decision is missing. Promotions are serialised by an exclusive
        file lock: aliases are last-writer-wins. When production moves, the new version is tagged
        with the version it replaces, so `requant rollback` knows where to go back to.
        """
        name, alias = self.settings.serving_model_name, alias or self.settings.production_alias
        with exclusive(lock_dir, f"promote-{name}"):
            interrupts.check()  # never move the alias after Ctrl-C or SIGTERM
            if alias == self.settings.production_alias:
                before = self.production()
                if before is not None and str(before.version) != str(version):
                    self.client.set_model_version_tag(name, str(version), TAG_PREVIOUS_PRODUCTION, str(before.version))
            self._set_alias(alias, version)

    def _set_alias(self, alias: str, version: str) -> None:
        """Point `alias` at `version` and read it back (the caller holds the promotion lock)."""
        name = self.settings.serving_model_name
        log.info("moving %s@%s to version %s", name, alias, version)
        self.client.set_registered_model_alias(name, alias, str(version))
        now = self.client.get_model_version_by_alias(name, alias)
        if str(now.version) != str(version):
            raise RequantError(f"alias {name}@{alias} reads back version {now.version}, expected {version}")
        log.info("moved %s@%s to version %s", name, alias, version)

    def drop_alias(self, alias: str, lock_dir: Path) -> None:
        """Remove `alias` from the serving model (nothing happens if it is not set)."""
        name = self.settings.serving_model_name
        with exclusive(lock_dir, f"promote-{name}"):
            if self.version_by_alias(alias) is not None:
                self.client.delete_registered_model_alias(name, alias)

    def flip_to_challenger(self, challenger_version: str, rollout_run_id: str, lock_dir: Path) -> None:
        """Move production to the challenger a shadow comparison accepted, then drop the challenger alias.

        Raises:
            RequantError: the challenger alias moved to another version since the comparison began
                (the comparison no longer describes it), or production does not read back.
        """
        name = self.settings.serving_model_name
        with exclusive(lock_dir, f"rollout-{name}"):
            now = self.challenger()
            if now is None or str(now.version) != str(challenger_version):
                raise RequantError(f"{name}@{self.settings.challenger_alias} moved to version "
                                   f"{now.version if now else 'none'} during the comparison of version "
                                   f"{challenger_version}: run `requant rollout` again")
            self.move_alias(challenger_version, lock_dir)
            self.client.set_model_version_tag(name, str(challenger_version), "requant.rolled_out_in", rollout_run_id)
            self.drop_alias(self.settings.challenger_alias, lock_dir)

    def rollback_target(self, current) -> str | None:
        """The version production should go back to from `current`: the production it replaced,
        skipping versions that were themselves rolled back; else the newest earlier version that
        requant registered and nobody rolled back. None when there is none."""
        name = self.settings.serving_model_name
        seen = {str(current.version)}
        previous = current.tags.get(TAG_PREVIOUS_PRODUCTION)
        while previous and previous not in seen:
            seen.add(previous)
            try:
                candidate = self.client.get_model_version(name, previous)
            except Exception:  # deleted since
                break
            if TAG_ROLLED_BACK_AT not in candidate.tags:
                return str(candidate.version)
            previous = candidate.tags.get(TAG_PREVIOUS_PRODUCTION)
        earlier = [v for v in self.client.search_model_versions(f"name = '{name}'")
                   if int(v.version) < int(current.version) and TAG_KEY in v.tags and TAG_ROLLED_BACK_AT not in v.tags]
        return str(max(earlier, key=lambda v: int(v.version)).version) if earlier else None

    def record_rollback(self, from_version: str, to_version: str, reason: str, user: str, lock_dir: Path) -> str:
        """Move production from `from_version` back to `to_version`, recorded; return the rollback run's id.

        The record: a `rollback` run (who, when, why, from, to) and tags on both versions; the
        rolled-back version keeps its decision key and config hash, so the nightly run can tell it
        was rolled back (`rolled_back_versions`). The alias moves last, after the record.

        Raises:
            RequantError: production is no longer `from_version` (someone moved it meanwhile).
        """
        from datetime import UTC, datetime

        name = self.settings.serving_model_name
        when = datetime.now(UTC).isoformat(timespec="seconds")
        with exclusive(lock_dir, f"rollout-{name}"):
            current = self.production()
            if current is None or str(current.version) != str(from_version):
                raise RequantError(f"{name}@{self.settings.production_alias} is version "
                                   f"{current.version if current else 'none'}, not {from_version}: run `requant rollback` again")
            record = {"from_version": str(from_version), "to_version": str(to_version), "reason": reason, "user": user,
                      "at": when, "decision_key": current.tags.get(TAG_KEY, ""),
                      "config_hash": current.tags.get(TAG_CONFIG_HASH, "")}
            run = self.client.create_run(self.experiment_id(), run_name=f"rollback-v{from_version}-to-v{to_version}",
                                         tags={**lineage_tags("flows.cli rollback"), TAG_KIND: "rollback",
                                               TAG_ROLLED_BACK_BY: user, TAG_ROLLED_BACK_AT: when,
                                               TAG_ROLLBACK_REASON: reason, "requant.from_version": str(from_version),
                                               TAG_ROLLED_BACK_TO: str(to_version)})
            run_id = run.info.run_id
            self.client.log_dict(run_id, record, "rollback.json")
            for key, value in {TAG_ROLLED_BACK_AT: when, TAG_ROLLED_BACK_BY: user, TAG_ROLLBACK_REASON: reason,
                               TAG_ROLLED_BACK_TO: str(to_version), TAG_ROLLBACK_RUN: run_id}.items():
                self.client.set_model_version_tag(name, str(from_version), key, value[:5000])
            self.client.set_model_version_tag(name, str(to_version), "requant.restored_from", str(from_version))
            self.client.set_model_version_tag(name, str(to_version), "requant.restored_at", when)
            with exclusive(lock_dir, f"promote-{name}"):
                interrupts.check()
                # Not move_alias: the restored version must not record the rolled-back one as its predecessor.
                self._set_alias(self.settings.production_alias, str(to_version))
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def rolled_back_versions(self) -> list[dict[str, str]]:
        """Every serving-model version `requant rollback` took out of production: one dict per version
        with version, decision_key, config_hash, at, by, reason, to (newest rollback first)."""
        name = self.settings.serving_model_name
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except Exception as exc:
            if is_not_found(exc):
                return []
            raise
        found = [{"version": str(v.version), "decision_key": v.tags.get(TAG_KEY, ""),
                  "config_hash": v.tags.get(TAG_CONFIG_HASH, ""), "at": v.tags[TAG_ROLLED_BACK_AT],
                  "by": v.tags.get(TAG_ROLLED_BACK_BY, ""), "reason": v.tags.get(TAG_ROLLBACK_REASON, ""),
                  "to": v.tags.get(TAG_ROLLED_BACK_TO, "")}
                 for v in versions if TAG_ROLLED_BACK_AT in v.tags]
        return sorted(found, key=lambda r: r["at"], reverse=True)

    def load_served_model(self, version: str):
        """The serving model's version as MLflow loads it for `mlflow models serve` (pyfunc: texts in, label and score out)."""
        return self._mlflow.pyfunc.load_model(f"models:/{self.settings.serving_model_name}/{version}")

    def version_run_metrics(self, version) -> dict[str, float]:
        """The metrics of the run that logged `version` (its candidate run: throughput, cost...); {} if none."""
        if not version.run_id:
            return {}
        return dict(self.client.get_run(version.run_id).data.metrics)

    def set_version_tags(self, version: str, tags: dict[str, str]) -> None:
        """Set tags on a serving-model version."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.settings.serving_model_name, str(version), key, str(value))

    def promote(self, model_uri: str, tags: dict[str, str], lock_dir: Path) -> str:
        """Register the winner and move the production alias to it (both steps at once); return the version."""
        version = self.register_winner(model_uri, tags, lock_dir)
        self.move_alias(version, lock_dir)
        return version

    def register_webhook(self, url: str, secret: str, name: str = "requant-retune") -> str:
        """Create (or replace) the registry webhook for model_version.created; return its id.

        Needs an `mlflow server` tracking URI: only the server sends webhooks.
        """
        if not self.uri.startswith(("http://", "https://")):
            raise RequantError(f"webhooks need an MLflow server, but the tracking URI is {self.uri}: set MLFLOW_TRACKING_URI")
        for existing in self.client.list_webhooks():
            if existing.name == name:
                self.client.delete_webhook(existing.webhook_id)
        return self.client.create_webhook(name=name, url=url, events=["model_version.created"], secret=secret).webhook_id
