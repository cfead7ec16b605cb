"""What a launcher (``accelerate launch``, torchrun) set up, checked before a run writes anything."""

from __future__ import annotations


def process_count_problem(environ, num_processes: int) -> str | None:
    """Why a process launched as one of ``WORLD_SIZE`` may not run the engine (pure).

    accelerate keeps one shared state per process: one made earlier with other settings (a bare
    ``PartialState()`` before a CPU run) leaves ``Accelerator(cpu=True)`` with one process and
    no process group although the launcher started several. Each rank would then train alone and
    write the same run dir, so the engine refuses that."""
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched <= 1 or num_processes == launched:
        return None
    return (f"launched as {launched} processes (WORLD_SIZE) but accelerate's state in this process "
            f"has {num_processes}: an accelerate state made before the run with other settings "
            "(e.g. PartialState() without cpu=True on a CPU machine); make none before the run, "
            "or make it with the run's device (PartialState(cpu=True) on the CPU)")


def run_on_cpu(device: str) -> bool:
    """Whether a run with ``device`` (cpu, cuda or auto) runs on the CPU."""
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def random_model_device(device: str, world_size: int) -> str | None:
    """Where the engine builds a ``random:`` model: on the GPU in a one-process GPU run (its
    initialisation takes well under a second there, ~45 s for a 1.7B model on 2 CPU cores), else
    on the CPU (``None``). Launched as several processes, each builds on the CPU as before: until
    accelerate is set up, every process's current GPU is the first."""
    return None if run_on_cpu(device) or world_size > 1 else "cuda"


__all__ = ["process_count_problem", "random_model_device", "run_on_cpu"]
