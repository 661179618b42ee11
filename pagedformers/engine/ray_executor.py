"""Tensor x pipeline ranks as actors of a Ray cluster (`distributed_executor_backend="ray"`), across its nodes.

The step protocol is the multiprocess executor's: the driver process is rank 0 and hosts the rendezvous store;
ranks 1.. are Ray actors, one CPU bundle each in a placement group spread over the nodes, each running the same
worker loop over torch.distributed. Connects to the cluster this process already joined (`ray.init(address=...)`)
or starts a local one.
"""

from __future__ import annotations

from typing import Any

from pagedformers.engine.multiproc_executor import MultiprocExecutor, worker_main


class _RayRank:
    """A rank's actor and its running loop, behind the multiprocessing.Process methods the executor uses. An actor
    serves one engine: once its loop has ended (or it is killed), the actor and its CPU bundle are released."""

    def __init__(self, name: str, actor: Any, done: Any, group: Any) -> None:
        self.name, self.actor, self.done, self.group = name, actor, done, group

    def is_alive(self) -> bool:
        import ray

        return not ray.wait([self.done], timeout=0)[0]

    @property
    def exitcode(self) -> int | None:
        return None if self.is_alive() else 1

    def join(self, timeout: float | None = None) -> None:
        import ray

        ray.wait([self.done], timeout=timeout)
        if not self.is_alive():
            self.kill()

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.kill(self.actor)
        try:
            remove_placement_group(self.group)  # the first rank's call releases it; the others' find it gone
        except Exception:  # noqa: BLE001 - already removed
            pass


class RayExecutor(MultiprocExecutor):
    def store_host(self) -> str:
        import ray

        if not ray.is_initialized():
            ray.init()
        return ray.util.get_node_ip_address()

    def start_workers(self, blob: bytes, host: str, port: int) -> list[Any]:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": 1}] * (self.world_size - 1), strategy="SPREAD")
        ray.get(group.ready(), timeout=self.config.parallel.distributed_timeout_s)
        rank_actor = ray.remote(num_cpus=1)(_RankActor)
        ranks = []
        for rank in range(1, self.world_size):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank - 1)
            actor = rank_actor.options(scheduling_strategy=strategy, name=None).remote()
            ranks.append(_RayRank(f"pagedformers-rank{rank} (Ray actor)", actor,
                                  actor.run.remote(blob, rank, self.world_size, host, port), group))
        return ranks


class _RankActor:
    def run(self, blob: bytes, rank: int, world_size: int, host: str, port: int) -> None:
        worker_main(blob, rank, world_size, host, port)
