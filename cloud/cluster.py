"""Vertex AI's cluster environment -> the variables Lightning's DDP reads.

Vertex starts one container per replica and describes the job to each in CLUSTER_SPEC (and the same in
TF_CONFIG's older naming), e.g. for a chief and two workers, on the second worker:

    {"cluster": {"workerpool0": ["chief-0:2222"], "workerpool1": ["worker-0:2222", "worker-1:2222"]},
     "task": {"type": "workerpool1", "index": 1}}

Lightning's default (LightningEnvironment) reads MASTER_ADDR, MASTER_PORT and NODE_RANK, and derives the
global rank as NODE_RANK x devices + LOCAL_RANK and the world size as trainer.num_nodes x devices; it starts
the `devices` processes of each machine itself (one here: LOCAL_RANK stays unset).
"""

import json

from common.cli import BundleError

CHIEF, WORKERS = "workerpool0", "workerpool1"
ALIASES = {"chief": CHIEF, "master": CHIEF, "worker": WORKERS}  # TF_CONFIG's names for the same pools


class ClusterError(BundleError):
    """Vertex's cluster description cannot be used for DDP; the message says why."""


def lightning_env(env: dict[str, str], devices: int = 1) -> dict[str, str]:
    """MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK for this replica; {} on a single machine."""
    raw = env.get("CLUSTER_SPEC") or env.get("TF_CONFIG")
    if not raw:
        return {}
    try:
        spec = json.loads(raw)
        pools = {ALIASES.get(name, name): hosts for name, hosts in spec["cluster"].items()}
        kind, index = ALIASES.get(spec["task"]["type"], spec["task"]["type"]), int(spec["task"]["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise ClusterError(f"CLUSTER_SPEC is not Vertex's cluster description: {err!r}") from None
    if len(pools.get(CHIEF, [])) != 1:
        raise ClusterError(f"CLUSTER_SPEC needs exactly one chief ({CHIEF}), found {pools.get(CHIEF, [])}")
    if kind not in (CHIEF, WORKERS):
        raise ClusterError(f"task type {spec['task']['type']!r} does not train: only {CHIEF} and {WORKERS} do")
    nodes = 1 + len(pools.get(WORKERS, []))
    address, _, port = pools[CHIEF][0].rpartition(":")
    return {
        "MASTER_ADDR": address,
        "MASTER_PORT": port,
        "WORLD_SIZE": str(nodes * devices),
        "NODE_RANK": str(0 if kind == CHIEF else 1 + index),
    }
