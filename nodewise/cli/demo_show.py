"""What the demo prints: a real prediction from the digits model, a generation from the multi-node
LM, and a `curl` line for each (the deploy's outcome is `nodewise deploy`'s, in deploy.py)."""

from __future__ import annotations

import json

import typer

from nodewise.cli.deploy import deploy_and_report
from nodewise.core.settings import Settings


def demo_multi_node(settings: Settings, retrain: bool) -> None:
    from mlflow import MlflowClient

    from nodewise.demo_models import DEMO_LM, register_demo_lm, too_small_inventory
    from tasks.planning.profile_models import profile_with_cache
    from tasks.planning.registry import resolve_model

    version = register_demo_lm(str(settings.state.artifacts), retrain=retrain)
    typer.echo(f"registered models:/{DEMO_LM}/{version} (a Llama-style causal LM, random weights), alias @champion")
    model = resolve_model(f"models:/{DEMO_LM}@champion", MlflowClient())
    profile = profile_with_cache(model, batch_size=settings.serve.max_batch_size, device="cpu")
    inventory = too_small_inventory(
        settings.state.demo_inventory,
        profile.total_bytes,
        profile.per_rank_bytes(2),
        settings.placement.headroom_fraction,
    )
    typer.echo(
        f"declared inventory {inventory}: 2 nodes on this machine, each too small for one copy "
        f"({profile.total_bytes / 2**20:.0f} MiB)"
    )
    record = deploy_and_report(f"models:/{DEMO_LM}@champion", None, settings, inventory)
    show_generation(record.endpoint)


def show_generation(endpoint: str) -> None:
    import httpx

    body = {"prompt": "nodewise serves", "max_new_tokens": 12}
    answer = httpx.post(f"{endpoint}/generate", json=body, timeout=60).json()
    typer.echo(f"generated (random weights, so nonsense): {answer['generated_text'][0]!r}")
    typer.echo(
        f"try it:\n  curl -s -X POST {endpoint}/generate -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body, separators=(',', ':'))}'"
    )


def show_prediction(endpoint: str) -> None:
    import httpx

    from nodewise.demo_models import digits_split

    _, _, x_test, y_test = digits_split()
    row = [round(float(v), 4) for v in x_test[0]]
    body = {"inputs": [row]}
    answer = httpx.post(f"{endpoint}/invocations", json=body, timeout=30).json()
    logits = answer["predictions"][0]
    predicted = max(range(len(logits)), key=logits.__getitem__)
    typer.echo(f"endpoint: {endpoint}/invocations")
    typer.echo(f"prediction for a test image of a {int(y_test[0])}: {predicted}")
    typer.echo(
        "try it:\n  curl -s -X POST " + f"{endpoint}/invocations -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body, separators=(',', ':'))}'"
    )
