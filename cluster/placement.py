"""Joining or starting a Ray cluster, and reserving one bundle per pipeline stage.

One bundle per stage: `{"GPU": 1, "CPU": c}` where the cluster has GPUs, else
`{"CPU": c}` (stages then run on CPU tensors). We check the cluster's resources
before asking, and wait for the placement group with a timeout, so a plan the
cluster cannot fit fails with a message instead of hanging.
"""

from __future__ import annotations

import os

from common.errors import ClusterError


class PlacementError(ClusterError):
    """The cluster cannot host the planned stages; the message lists its resources."""


def connect() -> str:
    """Join the cluster named by RAY_ADDRESS or the one running here, else start one.

    Returns how we got it ("joined" or "started"); a locally started cluster gets
    at least 2 CPUs so a stage and the driver's helpers can coexist.
    """
    import ray

    if ray.is_initialized():
        return "joined"
    quiet = {"log_to_driver": True, "logging_level": "WARNING"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)  # RAY_ADDRESS=local starts a fresh local cluster
        return "started" if os.environ["RAY_ADDRESS"] == "local" else "joined"
    try:
        ray.init(address="auto", **quiet)
        return "joined"
    except ConnectionError:
        ray.init(num_cpus=max(2, os.cpu_count() or 1), **quiet)
        return "started"


def describe_resources(total: dict) -> str:
    gpus = int(total.get("GPU", 0))
    cpus = total.get("CPU", 0)
    nodes = _alive_nodes()
    return f"{gpus} GPUs (CPU: {cpus:g}, nodes: {nodes})"


def _alive_nodes() -> int:
    # NOTE: not the `node:<ip>` resource keys: raylets sharing one IP share one key.
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def stage_bundles(num_stages: int, cpus_per_stage: float, device: str) -> list[dict]:
    """One resource bundle per stage; GPU bundles unless the run is CPU-only."""
    import ray

    total = ray.cluster_resources()
    use_gpu = device != "cpu" and total.get("GPU", 0) > 0
    if device == "cuda" and not use_gpu:
        raise PlacementError(
            f"pipeline.device=cuda but the cluster has {describe_resources(total)}. "
            "Use pipeline.device=auto or cpu, or join a cluster with GPUs."
        )
    bundle = {"GPU": 1, "CPU": cpus_per_stage} if use_gpu else {"CPU": cpus_per_stage}
    for resource, need in bundle.items():
        have = total.get(resource, 0)
        if have < need * num_stages:
            raise PlacementError(
                f"pipeline.num_stages={num_stages} needs {need * num_stages:g} {resource} "
                f"but the cluster has {describe_resources(total)}. "
                "Lower pipeline.num_stages (or pipeline.cpus_per_stage), or add nodes."
            )
    return [dict(bundle) for _ in range(num_stages)]


def reserve(bundles: list[dict], timeout_s: float, strategy: str = "PACK"):
    """A ready placement group for `bundles`, or PlacementError after `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"the cluster could not fit {len(bundles)} stage bundles {bundles[0]} with strategy "
            f"{strategy} within {timeout_s:g} s; it has {describe_resources(ray.cluster_resources())}, "
            f"available now: {describe_resources(ray.available_resources())}. "
            "Free resources, lower pipeline.num_stages, or add nodes."
        )
    return group


def bundle_nodes(group) -> list[str]:
    """Node id of each bundle, in bundle order."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(group)
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]


STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


def fits(resources: dict, bundle: dict) -> int:
    """How many copies of `bundle` one node's `resources` can hold."""
    return int(min(resources.get(key, 0) // need for key, need in bundle.items() if need > 0))


def choose_strategy(bundles: list[dict], placement: str) -> str:
    """Ray's placement strategy for the stages under `pipeline.placement`.

    auto: PACK when one node can hold every stage (activations stay on the node),
    else SPREAD, so a stage per node is placed without waiting for a node that never comes.
    """
    if placement != "auto":
        return STRATEGIES[placement]
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    best = max((fits(resources, bundles[0]) for resources in nodes), default=0)
    return "PACK" if best >= len(bundles) else "SPREAD"


def describe_placement(plan: list, strategy: str) -> str:
    """Where each stage (a StageRecord) landed, one line per stage, as logged once stages are loaded."""
    lines = [f"placement {strategy}:"]
    for stage in plan:
        gpu = stage.cuda_visible_devices
        lines.append(
            f"  {stage.name or stage.stage}  node {stage.node} ({(stage.node_id or '?')[:8]})  "
            f"device {stage.device}" + (f"  GPU {gpu}" if gpu else "")
        )
    return "\n".join(lines)
