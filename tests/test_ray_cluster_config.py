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


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("run", SHIPPED, ids=lambda path: path.name)
def test_the_cluster_can_host_every_shipped_run(config, run):
    from cluster.config import load_config
    from cluster.placement import fits

    run_config = load_config(run)
    bundle = {"GPU": 1, "CPU": run_config.pipeline.cpus_per_stage}  # cluster.placement.stage_bundle on GPUs
    types = config["available_node_types"]
    capacity = sum(fits(t["resources"], bundle) * t.get("max_workers", 0) for t in types.values())
    stages = run_config.pipeline.num_stages
    assert capacity >= (1 if stages == "auto" else stages), "the GPU workers cannot hold the run's stages"
    head = types[config["head_node_type"]]
    assert fits(head["resources"], bundle) == 0, "a stage could land on the head, away from the GPUs"
    assert head["resources"]["CPU"] >= run_config.analysis.num_actors, "the scan actors would not start"
    data = run_config.data.source
    if data != "stdlib" and not Path(data).suffix:  # a hub dataset id: the nodes need `datasets`
        assert any("moe-outliers[datasets]" in c for c in config["setup_commands"])


def test_every_node_starts_ray_as_the_readme_says(config):
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "--metrics-export-port=8080" in start and "RAY_AUTH_MODE=token" in start
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "8080 in `ray_cluster.yaml`" in readme


def test_every_node_gets_the_project_and_the_shared_auth_token(config):
    # Ray 2.60 token auth: head and workers must hold the same token as the submitting laptop.
    mounts = config["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    (project,) = [remote for remote, local in mounts.items() if local == "."]
    assert any(f'-e "{project.replace("~", "$HOME")}' in c for c in config["setup_commands"])
