"""Checks of how a training run was launched, against its settings, before anything is written.

Lightning finds the processes of a run of several GPUs or nodes through the environment a launcher sets (srun,
torchrun, jsrun, mpirun, or variables set by hand). A setting that disagrees with it made Lightning wait for ever
or fail at fit time, after the run folder had been replaced: :func:`check_nodes` and :func:`check_cluster` refuse
those in one line first. Every process of a DDP run executes ``train()``; :func:`launched_as_rank_zero` says which
one replaces the run folder.
"""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_RANK")
"""What Lightning's own environment reads, for processes on several nodes started by hand (its fallback)."""


def check_nodes(num_nodes: int) -> None:
    """Refuse ``trainer.num_nodes`` > 1 in a process that no launcher of several nodes started: Lightning would start
    this node's processes and wait for the other nodes' for ever. Lightning takes the first cluster environment
    that it detects: torchelastic (torchrun: ``TORCHELASTIC_RUN_ID``), SLURM (``SLURM_NTASKS``, set by srun, in a
    job not named ``bash`` or ``interactive``), LSF (jsrun's ``LSB_JOBID``, ``LSB_DJOB_RANKFILE``,
    ``JSM_NAMESPACE_LOCAL_RANK``, ``JSM_NAMESPACE_SIZE``) or MPI (mpi4py with more than one process); else its
    own, which finds the other nodes only through the :data:`LAUNCH_VARIABLES` set by hand."""
    if num_nodes <= 1:
        return
    from lightning_fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    if any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)):
        return
    if any(k in os.environ for k in LAUNCH_VARIABLES):
        return
    raise ConfigError(f"trainer.num_nodes is {num_nodes}, but no launcher of several nodes started this process "
                      "(srun in a SLURM job, torchrun, jsrun, mpirun, or MASTER_ADDR and NODE_RANK set by hand): "
                      "training would wait for the other nodes for ever; launch it with srun (docs/training.md), "
                      "or set trainer.num_nodes: 1 on one machine")


RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "NODE_RANK",
                  "GROUP_RANK", "LOCAL_RANK")
"""Where launchers give a process its rank: torchrun, srun, jsrun, Open MPI and MPICH (global ranks), and the node
and local ranks of Lightning's own processes (it starts a node's other processes again with ``LOCAL_RANK`` set)."""


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its run, by the ranks its launcher gave it (a process that no launcher
    started is). Only that one replaces the run folder: every process of a DDP run executes ``train()``, and several
    removing one folder at once fail (``rmtree`` finds the files another has removed) or remove what the first has
    begun to write."""
    return all(_int_env(k) in (None, 0) for k in RANK_VARIABLES)


def _checked_by_launch(t) -> bool:
    """Whether Lightning's launcher checks the cluster's numbers against ``trainer.devices`` and ``num_nodes``: only
    its DDP launcher that starts processes by script does (strategy ``ddp``, or ``auto`` with more than one process,
    which in an interactive Python is ``ddp_fork``). One process (Lightning's single-device strategy), ``ddp_spawn``
    and ``ddp_fork`` check nothing, and nothing is refused for them here."""
    if t.strategy == "auto":
        return (t.devices > 1 or t.num_nodes > 1) and not (hasattr(sys, "ps1") or sys.flags.interactive)
    return t.strategy in ("ddp", "ddp_find_unused_parameters_true")


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):  # unset, or nothing this check can read: left to Lightning
        return None


def check_cluster(t) -> None:
    """Refuse, before the run folder is replaced, what Lightning refuses (or fails on) only in ``fit``, when the
    cluster environment that it detects (the first of torchelastic, SLURM, LSF, as :func:`check_nodes`) disagrees
    with ``trainer.devices`` / ``trainer.num_nodes``:

    - SLURM (srun): more than one task without ``--ntasks-per-node`` (Lightning's SLURM environment refuses
      ``--ntasks`` alone, whatever the strategy); under its DDP launcher, ``SLURM_NTASKS_PER_NODE`` other than
      ``devices`` or ``SLURM_NNODES`` other than ``num_nodes`` (its ``validate_settings``);
    - torchrun: under the DDP launcher, ``WORLD_SIZE`` other than devices x num_nodes (``validate_settings``), or
      more processes on this node (``LOCAL_WORLD_SIZE``) than ``devices`` (an IndexError for local rank >= devices);
    - LSF (jsrun): under the DDP launcher, a local rank >= ``devices`` (the same IndexError; Lightning's LSF
      environment checks nothing, and the other processes cannot see this one's rank).

    What Lightning accepts is not refused (one process per task, ddp_spawn, fewer torchrun processes on a node than
    ``devices`` with the right world size, an LSF world size other than devices x num_nodes)."""
    from lightning_fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    devices, nodes = t.devices, t.num_nodes
    if TorchElasticEnvironment.detect():
        if not _checked_by_launch(t):
            return
        world, local = _int_env("WORLD_SIZE"), _int_env("LOCAL_WORLD_SIZE")
        if world is not None and world != devices * nodes:
            raise ConfigError(f"torchrun started {world} processes (WORLD_SIZE: --nnodes x --nproc-per-node) but "
                              f"trainer.devices x trainer.num_nodes is {devices} x {nodes} = {devices * nodes}: "
                              "set them equal")
        if local is not None and local > devices:
            raise ConfigError(f"torchrun started {local} processes on this node (--nproc-per-node) but "
                              f"trainer.devices is {devices}: set them equal")
    elif SLURMEnvironment.detect():
        ntasks, per_node, nnodes = _int_env("SLURM_NTASKS"), _int_env("SLURM_NTASKS_PER_NODE"), _int_env("SLURM_NNODES")
        if ntasks is not None and ntasks > 1 and "SLURM_NTASKS_PER_NODE" not in os.environ:
            hint = (f"--ntasks-per-node={ntasks // nnodes}" if nnodes and ntasks % nnodes == 0
                    else "--ntasks-per-node")
            raise ConfigError(f"SLURM runs {ntasks} tasks (--ntasks={ntasks}) without --ntasks-per-node, which "
                              f"Lightning needs: ask for #SBATCH {hint} instead of --ntasks, and set "
                              f"trainer.devices to it (now {devices})")
        if not _checked_by_launch(t):
            return
        if per_node is not None and per_node != devices:
            raise ConfigError(f"#SBATCH --ntasks-per-node={per_node} but trainer.devices is {devices}: set them equal")
        if nnodes is not None and nnodes != nodes:
            raise ConfigError(f"#SBATCH --nodes={nnodes} but trainer.num_nodes is {nodes}: set them equal")
    elif LSFEnvironment.detect() and _checked_by_launch(t):
        local_rank = _int_env("JSM_NAMESPACE_LOCAL_RANK")
        if local_rank is not None and local_rank >= devices:
            raise ConfigError(f"jsrun started this process as local rank {local_rank} of its node, but "
                              f"trainer.devices is {devices}: start as many processes per node as trainer.devices")
