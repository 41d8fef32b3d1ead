"""Whether a sweep's trials fit the Ray cluster: a trial's process (each worker's, with workers_per_trial) needs its
CPUs and GPUs on one node. A request that no node could ever hold is refused before the sweep starts; on an
autoscaling cluster, a request that no node holds now is queued (its trials stay PENDING until the autoscaler adds a
node that can), said in one log line.

What a driver learns from Ray 2.60: the nodes there are now (ray.nodes()); whether an autoscaler runs (a v1
autoscaler, as `ray up` and KubeRay start by default, reports its config's node types in its status, where the
read-only monitor of a plain `ray start --head` names each node's type after the node; a v2 one flags itself in the
GCS); and, where the cluster reports one to the GCS, the autoscaler's cluster config: the node
types it can start, with their resources and counts (what Ray Train and Ray Data read for the same purpose). Without
that config the node types are unknown here, so an autoscaling cluster queues any request. `--autoscale` says the
cluster grows where Ray cannot tell.
"""

import json
import logging
from dataclasses import dataclass

import ray

from ..errors import ConfigError
from .trial import TRAIN_DRIVER_CPUS

logger = logging.getLogger(__name__)

AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS, written by the v1 monitor


@dataclass(frozen=True)
class NodeShape:
    """The CPUs and GPUs of a node, or of a node type an autoscaler can start."""

    name: str
    cpus: float
    gpus: float

    def holds(self, cpus, gpus):
        return self.cpus >= cpus and self.gpus >= gpus

    def __str__(self):
        return f"{self.name}: {self.cpus:g} CPUs, {self.gpus:g} GPUs"


def _need(cpus, gpus):
    return f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")


@dataclass
class Cluster:
    """The nodes of a Ray cluster now, the node types its autoscaler can start (None: unknown) and whether it grows."""

    nodes: list
    node_types: list = None
    autoscaling: bool = False

    @classmethod
    def probe(cls, autoscale=False):
        """The cluster Ray is connected to; `autoscale` (--autoscale) says it grows when Ray cannot tell."""
        nodes = [
            NodeShape(node["NodeManagerAddress"], node["Resources"].get("CPU", 0), node["Resources"].get("GPU", 0))
            for node in ray.nodes()
            if node["Alive"]
        ]
        groups = _autoscaler_node_groups()
        node_types = None if groups is None else [shape for shape, _ in groups]
        grows = any(scalable for _, scalable in groups or []) or _v1_autoscaler_runs() or _v2_autoscaler_runs()
        return cls(nodes, node_types, autoscale or grows)

    def capacity(self, sweep, cpus_per_trial=None, gpus_per_trial=None, workers_per_trial=None, gpus_per_worker=None):
        """The resources resolve_resources may count on (with the same command-line values): the cluster's now, or
        for an autoscaling cluster what its node types add up to. Where those are unknown, what the sweep asks for
        explicitly (the command line's, else the sweep file's) is taken to come, and what it leaves to the cluster
        follows the nodes there now."""
        now = {"CPU": sum(node.cpus for node in self.nodes), "GPU": sum(node.gpus for node in self.nodes)}
        if not self.autoscaling:
            return now
        if self.node_types is not None:
            grown = _max_resources()
            return {key: max(value, grown.get(key, 0)) for key, value in now.items()}
        workers = workers_per_trial or sweep.workers_per_trial
        cpus = (cpus_per_trial or sweep.cpus_per_trial) + (TRAIN_DRIVER_CPUS if workers > 1 else 0)
        per_worker = sweep.gpus_per_worker if gpus_per_worker is None else gpus_per_worker
        gpus = max(sweep.gpus_per_trial, workers * per_worker) if gpus_per_trial is None else gpus_per_trial
        return {"CPU": max(now["CPU"], cpus), "GPU": max(now["GPU"], gpus)}

    def check(self, sweep):
        """Refuse (ConfigError, one line) trials whose processes no node could ever hold; on an autoscaling cluster,
        log one line when no node holds one now, so that its trials wait for the autoscaler."""
        workers = sweep.workers_per_trial
        cpus, gpus = sweep.cpus_per_trial / workers, sweep.gpus_per_trial / workers
        what = (f"each of a trial's {workers} workers" if workers > 1 else "each trial") + f" needs {_need(cpus, gpus)}"
        if any(node.holds(cpus, gpus) for node in self.nodes):
            return
        largest = max(self.nodes, key=lambda node: (node.gpus, node.cpus), default=None)
        if not self.autoscaling:
            raise ConfigError(
                f"{what} on one node, and no node of the Ray cluster has that (largest {largest}): lower "
                "--cpus-per-trial / --gpus-per-trial (or the sweep's resources:), or pass --autoscale if the cluster "
                "adds nodes"
            )
        if self.node_types is not None:
            fitting = [shape.name for shape in self.node_types if shape.holds(cpus, gpus)]
            if not fitting:
                types = "; ".join(str(shape) for shape in self.node_types)
                raise ConfigError(
                    f"{what} on one node, and no node type of the cluster's autoscaler has that ({types})"
                )
            coming = f"a {' or '.join(fitting)} node"
        else:
            coming = "a node that holds them"
        logger.warning(
            f"Trials PENDING: {what} on one node, and no node has that now (largest {largest}); they start when the "
            f"autoscaler adds {coming}"
        )


def _autoscaler_node_groups():
    """(NodeShape, can it scale up) per node type of the autoscaler's cluster config in the GCS; None without one."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [
        (
            NodeShape(group.name, group.resources.get("CPU", 0), group.resources.get("GPU", 0)),
            group.max_count == -1 or group.max_count > group.min_count,
        )
        for group in config.node_group_configs
        if group.max_count != 0
    ]


def _max_resources():
    """What the autoscaler's node types add up to at their max counts (Ray's own reading of its cluster config)."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() or {}


def _v2_autoscaler_runs():
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return is_autoscaler_v2(fetch_from_server=True)


def _v1_autoscaler_runs():
    """A v1 autoscaler's monitor reports the node types of its config. `ray start --head` without one runs a read-only
    monitor, whose report names each node's type after the node itself."""
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(AUTOSCALER_STATUS_KEY)
    report = (json.loads(status).get("autoscaler_report") if status else None) or {}
    node_types = report.get("node_type_mapping") or {}
    return any(node_type != format_readonly_node_type(node_id) for node_id, node_type in node_types.items())
