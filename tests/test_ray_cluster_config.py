"""ray_cluster.yaml is a valid cluster-launcher config by Ray's own schema, and it sets up this project.

A real cluster is not available here; `ray up` reads the same schema and defaults
(`prepare_config`, `validate_config`) that this test applies.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

CONFIG = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_config_passes_rays_schema_as_written_and_with_defaults(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, schema())  # our keys alone
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks


def test_a_misspelt_key_is_rejected(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_a100_80gb"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(bad))


def test_gpu_workers_install_the_project_and_export_metrics(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # stages go to GPU workers only
    gpus = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpus and all(t["node_config"]["InstanceType"] == "p4de.24xlarge" for t in gpus)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["file_mounts"]["~/moe-outliers"] == "."
    assert any("-e \"$HOME/moe-outliers[datasets]\"" in c for c in config["setup_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "--metrics-export-port=8080" in start and "RAY_AUTH_MODE=token" in start


def test_every_node_gets_the_shared_auth_token(config):
    # Ray 2.60 token auth: head and workers must hold the same token as the submitting laptop.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
