"""cluster.yaml is a valid Ray cluster launcher config that carries the auth token to every node."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # what `ray up` does first; raises on a schema violation
    types = config["available_node_types"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert config["max_workers"] >= types["cpu_worker"]["max_workers"]


def test_every_node_starts_ray_with_token_auth_and_gets_the_token():
    config = yaml.safe_load(CLUSTER.read_text())
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert any("pip install" in c and "~/nic" in c for c in config["setup_commands"])
