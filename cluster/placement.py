"""Joining or starting a Ray cluster, and reserving one placement group per pipeline replica.

One bundle per stage: `{"GPU": 1, "CPU": c}` where the cluster has GPUs, else
`{"CPU": c}` (stages then run on CPU tensors); one placement group of N bundles per
replica. Under `placement: auto` a replica whose stages fit one node is held there
(STRICT_PACK, so its hand-offs stay on the node), and the replicas are spread over the
nodes (`targets`). We check the cluster's resources before asking, and wait for the
groups with a timeout, so a plan the cluster cannot fit fails with a message instead of
hanging.
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


def stage_bundle(cpus_per_stage: float, device: str) -> dict:
    """The resources of one stage: a GPU and its CPUs, or CPUs alone on a CPU-only run."""
    import ray

    total = ray.cluster_resources()
    use_gpu = device != "cpu" and total.get("GPU", 0) > 0
    if device == "cuda" and not use_gpu:
        raise PlacementError(
            f"pipeline.device=cuda but the cluster has {describe_resources(total)}. "
            "Use pipeline.device=auto or cpu, or join a cluster with GPUs."
        )
    return {"GPU": 1, "CPU": cpus_per_stage} if use_gpu else {"CPU": cpus_per_stage}


def count_replicas(setting: int | str, num_stages: int, bundle: dict, total: dict) -> int:
    """How many replicas of `num_stages` stages to run: `auto` is as many as the cluster's GPUs
    hold (floor(GPUs / N), within its CPUs), 1 without GPUs; an integer must fit the cluster."""
    room = min(total.get(key, 0) // (need * num_stages) for key, need in bundle.items() if need > 0)
    wanted = (int(room) if "GPU" in bundle else 1) if setting == "auto" else setting
    count = max(wanted, 1)
    asked = f"pipeline.num_replicas={count} x num_stages={num_stages}" if count > 1 else \
        f"pipeline.num_stages={num_stages}"
    for resource, need in bundle.items():
        if total.get(resource, 0) < need * num_stages * count:
            raise PlacementError(
                f"{asked} needs {need * num_stages * count:g} {resource} but the cluster has "
                f"{describe_resources(total)}. Lower {'pipeline.num_replicas, ' if count > 1 else ''}"
                "pipeline.num_stages (or pipeline.cpus_per_stage), or add nodes."
            )
    return count


def targets(rooms: dict[str, int], num_stages: int, num_replicas: int) -> list[str | None]:
    """The node each replica is held on (`rooms`: node id -> stages it can hold), spreading the
    replicas over the nodes: each goes to the node with the fewest replicas so far among those
    with room for all its stages (the most room first); None where no node has room left."""
    left, given = dict(rooms), dict.fromkeys(rooms, 0)
    chosen = []
    for _ in range(num_replicas):
        fit = [node for node, room in left.items() if room >= num_stages]
        node = min(fit, key=lambda n: (given[n], -left[n], n)) if fit else None
        if node is not None:
            left[node] -= num_stages
            given[node] += 1
        chosen.append(node)
    return chosen


def probe_gpu_memory(timeout_s: float) -> int | None:
    """The memory of one GPU of the cluster, read by a task on a GPU node (None where torch sees
    no GPU there, as with the fake GPUs of a test cluster)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def total_memory():
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None

    ref = total_memory.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref)
        raise PlacementError(f"no GPU of the cluster answered within {timeout_s:g} s to tell its memory; "
                             "set pipeline.gpu_memory_gib, or free a GPU.")
    return ray.get(ref)


def node_rooms(bundle: dict) -> dict[str, int]:
    """Alive node id -> how many stage bundles it can hold."""
    import ray

    return {n["NodeID"]: fits(n["Resources"], bundle) for n in ray.nodes() if n.get("Alive")}


def reserve_replicas(num_replicas: int, num_stages: int, bundle: dict, placement: str,
                     timeout_s: float) -> list[tuple]:
    """One ready placement group per replica, as (group, strategy, target node or None), all
    asked for at once; PlacementError after `timeout_s` if they do not all fit."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    chosen = targets(node_rooms(bundle), num_stages, num_replicas) if placement == "auto" else [None] * num_replicas
    strategies = [strategy_for(placement, target) for target in chosen]
    groups = [(placement_group([dict(bundle)] * num_stages, strategy=strategy, _soft_target_node_id=target),
               strategy, target) for strategy, target in zip(strategies, chosen)]
    ready, _ = ray.wait([group.ready() for group, _, _ in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for group, _, _ in groups:
            remove_placement_group(group)
        raise PlacementError(not_placed(f"{num_replicas} replica(s) of {num_stages} stage bundles {bundle}",
                                        ",".join(sorted(set(strategies))), timeout_s))
    return groups


def not_placed(what: str, strategy: str, timeout_s: float) -> str:
    import ray

    return (f"the cluster could not fit {what} with strategy {strategy} within {timeout_s:g} s; it has "
            f"{describe_resources(ray.cluster_resources())}, available now: "
            f"{describe_resources(ray.available_resources())}. "
            "Free resources, lower pipeline.num_replicas or pipeline.num_stages, or add nodes.")


def strategy_for(placement: str, target: str | None) -> str:
    """Ray's strategy for one replica: under auto, STRICT_PACK on its node when it has one, else
    SPREAD, so a stage per node is placed without waiting for a node that never comes."""
    if placement != "auto":
        return STRATEGIES[placement]
    return "STRICT_PACK" if target else "SPREAD"


def reserve(bundles: list[dict], timeout_s: float, strategy: str = "PACK"):
    """A ready placement group for `bundles`, or PlacementError after `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(not_placed(f"{len(bundles)} stage bundles {bundles[0]}", strategy, timeout_s))
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


def describe_placement(plan: list) -> str:
    """Where each stage (a StageRecord) of each replica landed, one line per actor."""
    replicas = len({stage.replica for stage in plan})
    lines = [f"placement: {replicas} replica(s) x {len(plan) // max(replicas, 1)} stage(s)"]
    for stage in plan:
        gpu = stage.cuda_visible_devices
        lines.append(
            f"  {stage.name or stage.stage}  node {stage.node} ({(stage.node_id or '?')[:8]})  "
            f"device {stage.device}" + (f"  GPU {gpu}" if gpu else "")
        )
    return "\n".join(lines)
