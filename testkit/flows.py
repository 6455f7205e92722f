"""The real flows, started the way the CLI starts them: each test's settings reach the flow run
through ``using_settings`` (flows take no settings parameter: Prefect stores every parameter)."""

from __future__ import annotations

from typing import Any

from nodewise.core.settings import Settings, using_settings


def deploy_model(model_uri: str, *, settings: Settings, **kwargs: Any) -> Any:
    from flows.deploy import deploy_model as flow

    with using_settings(settings):
        return flow(model_uri, **kwargs)


def watch_deployments(*, settings: Settings) -> Any:
    from flows.watchdog import watch_deployments as flow

    with using_settings(settings):
        return flow()


def profile_new_version(model_name: str, version: str, *, settings: Settings, **kwargs: Any) -> Any:
    from flows.profile_version import profile_new_version as flow

    with using_settings(settings):
        return flow(model_name, version, **kwargs)


def start_rollout(model_name: str, *, settings: Settings, **kwargs: Any) -> Any:
    from flows.rollout import start_rollout as flow

    with using_settings(settings):
        return flow(model_name, **kwargs)


def decide_rollouts(*, settings: Settings, **kwargs: Any) -> Any:
    from flows.rollout import decide_rollouts as flow

    with using_settings(settings):
        return flow(**kwargs)
