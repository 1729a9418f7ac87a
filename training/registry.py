"""The MLflow model registry that training fills (training/tracking.py: a new version of `<name>` per run, its
lineage.json naming the version): an alias (`champion`) names the version to ship; `fetch` hands that version's
files to the archive (archive.from_alias), `promote` moves the alias to the version a server serves.
"""

import logging
from pathlib import Path

from handlers import files
from training import lineage
from training.tracking import TrackingError, first_line, store_uri

log = logging.getLogger(__name__)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store_uri(uri))


def fetch(uri: str, name: str, alias: str, names: list[str], folder: Path | str) -> dict:
    """Download these files of the run behind `<name>@<alias>` in the MLflow registry at `uri` into `folder`;
    return its lineage (lineage.json, whose `registry` names the version). Missing files are a TrackingError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    registry = client(uri)
    try:
        version = registry.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise TrackingError(f"no version of {name} has the alias {alias!r} in {uri}: {first_line(err)}") from None
    for artifact in dict.fromkeys([files.LINEAGE, *names]):
        try:
            mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=artifact, dst_path=str(folder), tracking_uri=registry.tracking_uri
            )
        except (MlflowException, OSError) as err:
            raise TrackingError(
                f"{name} version {version.version} (run {version.run_id}) has no {artifact}: {first_line(err)}"
            ) from None
    record = lineage.read(folder)
    if (record or {}).get("registry", {}).get("version") != str(version.version):
        raise TrackingError(f"{name} version {version.version}: its run's {files.LINEAGE} names another version")
    log.info("%s@%s is version %s (run %s)", name, alias, version.version, version.run_id)
    return record


def promote(record: dict | None, alias: str) -> str | None:
    """Point `alias` at the registry version that this lineage record names (a served model's); returns that
    version, or None when the record names none (another tracker, an archive from before the registry)."""
    entry = (record or {}).get("registry")
    if not entry or record.get("tracker") != "mlflow":
        log.info("the model names no registry version: alias %s not moved", alias)
        return None
    from mlflow.exceptions import MlflowException

    try:
        client(record["tracking_uri"]).set_registered_model_alias(entry["model"], alias, entry["version"])
    except MlflowException as err:
        raise TrackingError(
            f"cannot set {entry['model']}@{alias} to version {entry['version']} at {record['tracking_uri']}: "
            f"{first_line(err)}"
        ) from None
    return entry["version"]
