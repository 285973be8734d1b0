"""Executors: run pending batches through BatchGenerators and hand each result to the sink.

local  one BatchGenerator (one pipeline) in this process, batches in order.
ray    one Ray actor per worker, each with its own pipeline (num_gpus=1 when the config's device
       is CUDA, else one CPU and `threads` torch threads, default 1); an ActorPool hands a batch
       to whichever actor is free (dynamic pulling), actors are restarted and their in-flight
       batch retried when their process dies. Actors return rows and PNG bytes; only this
       driver writes, so a retried batch can never reach the store twice and no shared
       filesystem is needed between nodes.

Both show a tqdm bar of images done, images per second and the ETA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tqdm.auto import tqdm

from .config import AuditConfig
from .runner import BatchGenerator, ClassifierFactory, ResultSink, WorkItem, default_classifier

# Restarts of a dead Ray actor, and re-runs of the batch it held (kills, OOM, lost nodes).
# Exceptions raised by the generation itself are not retried: they would fail again.
RAY_MAX_RESTARTS = 3


def progress_bar(batches: Sequence[Sequence[WorkItem]], enabled: bool) -> tqdm:
    """A tqdm bar over the batches' images: images done, images/s and the ETA."""
    total = sum(len(batch) for batch in batches)
    return tqdm(total=total, unit="img", desc="audit", disable=not enabled, smoothing=0.1)


def run_local(
    config: AuditConfig,
    batches: Sequence[Sequence[WorkItem]],
    sink: ResultSink,
    *,
    classifier_factory: ClassifierFactory | None = default_classifier,
    progress: bool = True,
) -> None:
    """Run every batch in this process on config.device, committing each as it finishes."""
    import torch

    threads_before = torch.get_num_threads()  # config.threads applies to this run only
    try:
        generator = BatchGenerator(
            config, classifier_factory, worker="local", threads=config.threads
        )
        with progress_bar(batches, progress) as bar:
            for batch in batches:
                sink.commit(generator.run(batch))
                bar.update(len(batch))
    finally:
        torch.set_num_threads(threads_before)


def ray_worker_count(config: AuditConfig, cluster_gpus: float) -> int:
    """config.workers, else one worker per GPU in the cluster when running on CUDA, else 1."""
    if config.workers is not None:
        return config.workers
    if config.device != "cpu" and cluster_gpus >= 1:
        return int(cluster_gpus)
    return 1


def connect_ray(config: AuditConfig) -> bool:
    """Make sure Ray is initialised; returns True when this call started it (then the caller
    shuts it down). Uses config.ray_address, else RAY_ADDRESS, else starts a local cluster;
    an already initialised Ray is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Leave CPUs beyond the workers' own: with exactly one CPU per worker a 2-worker local
        # cluster hung on this machine (DESIGN.md section 3).
        wanted = (config.workers or 1) * (config.threads or 1)
        ray.init(num_cpus=max(4, wanted + 2), include_dashboard=False)
    return True


def start_ray_workers(
    config: AuditConfig, classifier_factory: ClassifierFactory | None = default_classifier
) -> list:
    """Start the audit's Ray actors (BatchGenerators), one pipeline each; Ray must be up.

    GPU actors (num_gpus=1) when the config's device is not cpu and the cluster has GPUs,
    else CPU actors of config.threads (default 1) CPUs and torch threads.
    """
    import ray

    threads = config.threads or 1
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = config.device != "cpu" and gpus >= 1
    actor_class = ray.remote(
        num_cpus=0 if use_gpu else threads,
        num_gpus=1 if use_gpu else 0,
        max_restarts=RAY_MAX_RESTARTS,
        max_task_retries=RAY_MAX_RESTARTS,
    )(BatchGenerator)
    config_data = config.model_dump(mode="json")
    return [
        actor_class.remote(config_data, classifier_factory, f"ray-{index}", threads)
        for index in range(ray_worker_count(config, gpus))
    ]


def drain_ray(
    actors: Sequence, batches: Sequence[Sequence[WorkItem]], sink: ResultSink, bar: tqdm
) -> None:
    """Hand the batches to whichever actor is free (ActorPool) and commit results as they come."""
    from ray.util.actor_pool import ActorPool

    pool = ActorPool(list(actors))
    for results in pool.map_unordered(lambda actor, batch: actor.run.remote(batch), list(batches)):
        sink.commit(results)
        bar.update(len(results))


def run_ray(
    config: AuditConfig,
    batches: Sequence[Sequence[WorkItem]],
    sink: ResultSink,
    *,
    classifier_factory: ClassifierFactory | None = default_classifier,
    progress: bool = True,
) -> None:
    """Run the batches on Ray actors (one pipeline each); see the module docstring."""
    import ray

    started_here = connect_ray(config)
    try:
        actors = start_ray_workers(config, classifier_factory)
        try:
            with progress_bar(batches, progress) as bar:
                drain_ray(actors, batches, sink, bar)
        finally:
            for actor in actors:
                ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
