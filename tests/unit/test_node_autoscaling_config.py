"""Node autoscaling of the local instance: the config Ray's autoscaler gets, the inventory the
plan sees, and what `nodewise status` says of the nodes."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from nodewise.cli.app import _nodes
from nodewise.core.settings import Settings
from tasks.planning.inventory_sources import read_inventory
from tasks.rayserve.cluster import AUTOSCALING_ENV, write_autoscaling_config


def test_the_autoscaling_config_names_rays_fake_multinode_provider_and_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path, ray={"num_cpus": 2, "port": 7000, "max_added_nodes": 3, "added_node_cpus": 4}
    )
    (tmp_path / "ray").mkdir()
    config = json.loads(write_autoscaling_config(settings).read_text())
    assert config["provider"]["module"] == "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
    assert config["provider"]["gcs_address"] == "127.0.0.1:7000"
    assert config["max_workers"] == 3
    assert config["idle_timeout_minutes"] == 1.0  # the 60 s default
    types = config["available_node_types"]
    assert types["ray.head.default"]["resources"] == {"CPU": 2}
    [added] = [t for name, t in types.items() if name != "ray.head.default"]
    assert (added["resources"], added["min_workers"], added["max_workers"]) == ({"CPU": 4}, 0, 3)
    assert AUTOSCALING_ENV["RAY_FAKE_CLUSTER"] == "1"
    # the provider class exists in the installed Ray under that name
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider  # noqa: F401


def test_the_local_inventory_counts_the_nodes_that_may_be_added() -> None:
    inventory = read_inventory("local", 1, added_nodes=2, added_node_cpus=3)
    assert [n.cpus for n in inventory.nodes] == [1, 3, 3]
    assert len(read_inventory("local", 1).nodes) == 1


def test_settings_refuse_a_negative_node_count() -> None:
    with pytest.raises(ValidationError, match="max_added_nodes"):
        Settings(ray={"max_added_nodes": -1})


def test_status_says_how_many_nodes_run_were_added_and_removed() -> None:
    head = {"node_id": "a", "address": "127.0.0.1", "cpus": 1.0, "head": True}
    added = {"node_id": "b", "address": "127.0.0.1", "cpus": 1.0, "head": False}
    assert _nodes(None) == ""
    assert _nodes({"alive": [head, added], "removed": [], "max_added_nodes": 2}) == (
        "; 2 node(s) alive (1 added by Ray's autoscaler, at most 2)"
    )
    assert _nodes({"alive": [head], "removed": [added], "max_added_nodes": 2}) == (
        "; 1 node(s) alive (0 added by Ray's autoscaler, at most 2), 1 removed"
    )
    assert _nodes({"alive": [head], "removed": [], "max_added_nodes": None}) == "; 1 node(s) alive"
