"""Tracking: the only package that imports mlflow.

Importing any of its modules first turns off usage telemetry (moeplat.track.telemetry), so mlflow
is never imported with it on unless the user opted in."""

from moeplat.track.telemetry import no_telemetry

no_telemetry()
