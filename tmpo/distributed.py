"""Several processes training one policy: the plumbing the loop calls through one small interface.

A run holds one :class:`Processes`. The base class *is* the single process: every collective is the
identity and nothing is imported, so ``python -m tmpo.run`` runs exactly as it would without this
module. :class:`AcceleratedProcesses` is the multi-process case, on HF accelerate (DDP), started by
``accelerate launch --num_processes N -m tmpo.run ...`` or as one SLURM task per GPU
(``hydra/launcher=slurm``; :func:`from_environment`). The contract, for ``W`` processes:

* **Batch.** Process ``r`` holds the prompt groups ``r, r + W, ...`` of an iteration's
  ``trainer.prompts_per_step`` (:func:`group_shard`; the same number each): a group's K leaves never
  straddle processes, since group-relative advantages need the whole group. Noise is drawn per group from
  ``(seed, step, global group index)`` (:class:`tmpo.seeding.GroupGenerators`), so the processes
  together draw exactly the rollouts one process draws for the same global batch.
* **Gradient.** The policy network is wrapped in DDP for the update's gradient passes only. The chunked
  backward passes of an optimizer step run under ``no_sync`` except the last, whose backward averages
  the accumulated gradients over processes once, before clipping. Each process's loss is a mean over the
  same number of terms (whole groups, one shared plan), so that average is the mean over the global
  batch; the KL-to-reference term, whose per-leaf weights can differ between processes (GARDO's gate),
  is normalised by the global weight total (:meth:`Processes.sum`). Objectives with batch-wide
  statistics gather what they need (:meth:`Processes.gather`).
* **Logging.** The statistics the loop logs are gathered or reduced to global values on every process;
  only rank 0 writes (checkpoints, metrics.jsonl, summary.json, samples.png, wandb), the others wait at
  barriers. A stop signal or a non-finite rollout on any process stops every process at the same
  iteration (:meth:`Processes.agree_stop`, :meth:`Processes.check_faults`).
* **Evaluation.** The test prompts are split into contiguous blocks (:func:`eval_shards`); each process
  samples its block from the initial noises the whole set draws, scores it, and the per-sample results
  are gathered back in prompt order, every sample exactly once (:meth:`Processes.gather_rows`).

FSDP and DeepSpeed are refused: the loop reads and writes the full LoRA weights outside the network's
forward (EMA, the reference adapter, checkpoints, export), which sharded parameters do not allow.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

_log = logging.getLogger(__name__)


def group_shard(n_groups: int, world_size: int, rank: int) -> range:
    """The global indices of the prompt groups process ``rank`` holds: ``rank, rank + W, rank + 2W, ...``
    (whole groups, the same number on every process).

    Strided rather than contiguous so that a whole-group minibatch split agrees with one process: with
    ``minibatch_split=groups`` process ``r`` cuts its groups into ``n`` blocks, and when ``n`` divides its
    group count the ``i``-th blocks of all processes together are exactly the ``i``-th block of the
    one-process run (``tensor_split(arange(G), n)[i]``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes")
    if n_groups % world_size:
        raise ValueError(
            f"trainer.prompts_per_step={n_groups} is not divisible by the {world_size} processes: each process takes "
            f"the same number of whole prompt groups; use a multiple of {world_size} (e.g. {world_size * max(1, n_groups // world_size)})"
        )
    return range(rank, n_groups, world_size)


def check_minibatches(minibatches: int, split: str, prompts_per_step: int, world_size: int) -> None:
    """Several processes take the ``i``-th minibatch of each of their groups' splits together, so a
    whole-group split (``minibatch_split=groups``) needs at least ``minibatches`` groups per process:
    with fewer, one process would hold nothing to train in some optimizer step."""
    per_process = prompts_per_step // world_size
    if world_size > 1 and split == "groups" and per_process < minibatches:
        raise ValueError(
            f"trainer.minibatches={minibatches} with trainer.minibatch_split=groups takes whole prompt groups per optimizer "
            f"step, but trainer.prompts_per_step={prompts_per_step} over {world_size} processes leaves {per_process} group(s) "
            f"per process. Use trainer.prompts_per_step={minibatches * world_size} ({minibatches} groups per process), "
            "trainer.minibatches=1 (one optimizer step per rollout) or trainer.minibatch_split=group_leaves (each step a "
            "share of every group's leaves)"
        )


def eval_shards(n: int, world_size: int) -> list[slice]:
    """``n`` evaluation prompts as ``world_size`` contiguous blocks whose sizes differ by at most one (the
    first ``n % W`` blocks hold one more): every prompt in exactly one block, no padding."""
    if n < world_size:
        raise ValueError(f"{n} evaluation prompts cannot be split over {world_size} processes (each needs at least "
                         f"one): raise eval.max_prompts (or the suite's max_prompts) to at least {world_size}")
    base, extra = divmod(n, world_size)
    sizes = [base + (r < extra) for r in range(world_size)]
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [slice(s, s + k) for s, k in zip(starts, sizes)]


class Processes:
    """One process: every collective is the identity (the default; the loop then behaves as if alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def groups(self, n_groups: int) -> range:
        """The global indices of this process's prompt groups of an iteration's batch (:func:`group_shard`)."""
        return group_shard(n_groups, self.world_size, self.rank)

    def eval_part(self, n: int) -> tuple[slice, list[int]]:
        """This process's block of ``n`` evaluation prompts and every block's size (:func:`eval_shards`)."""
        shards = eval_shards(n, self.world_size)
        return shards[self.rank], [s.stop - s.start for s in shards]

    # --- collectives (the identity here) ----------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every process got here."""

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over processes."""
        return value

    def gather(self, tensor: Tensor) -> Tensor:
        """Equal-sized ``[n, ...]`` tensors of every process, concatenated in rank order (``[W*n, ...]``; for
        per-group rows that is process 0's groups first, not the batch's order: use it for statistics
        that do not depend on the order)."""
        return tensor

    def local(self, gathered: Tensor) -> Tensor:
        """This process's rows of a :meth:`gather` result."""
        return gathered

    def gather_rows(self, tensor: Tensor, counts: Sequence[int]) -> Tensor:
        """``[counts[rank], ...]`` rows of every process concatenated in rank order, padding removed."""
        return tensor

    def reduce_steps(self, rows: list[dict[str, float]], summed: Sequence[str], maxed: Sequence[str]) -> list[dict[str, float]]:
        """Per-optimizer-step statistics as global values: the sum over processes for ``summed`` keys, the
        max for ``maxed`` keys, the mean otherwise (each process's value is a mean over equally many terms)."""
        return rows

    def agree_stop(self, signum: int | None) -> int | None:
        """The stop signal any process received (the largest number, so a preemption outranks SIGINT), or None."""
        return signum

    def check_faults(self, error: Exception | None, iteration: int) -> None:
        """Raise ``error``, or a :class:`tmpo.faults.NonFiniteError` if another process hit one."""
        if error is not None:
            raise error

    # --- the policy's gradient --------------------------------------------------------------------
    def prepare(self, policy: nn.Module) -> None:
        """Wrap the policy network for gradient synchronisation (before the first update)."""

    def backward(self, policy: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context for one chunk's forward and backward of an optimizer step; only the ``last`` chunk's
        backward communicates."""
        return contextlib.nullcontext()

    def reduce_grads(self, params: Sequence[Tensor]) -> None:
        """Average the gradients of parameters outside the wrapped network (an objective's own)."""


class AcceleratedProcesses(Processes):
    """``W > 1`` processes through HF accelerate: DDP on NCCL (GPUs) or gloo (CPU, tests)."""

    def __init__(self) -> None:
        from accelerate import Accelerator, DistributedType

        _check_launch_settings()
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        kind = self.accelerator.distributed_type
        if kind not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            raise ValueError(f"accelerate set up {kind}; tmpo runs several processes with DDP only "
                             "(accelerate launch --config_file conf/accelerate/ddp.yaml, see README)")
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self._ddp: nn.Module | None = None

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def sum(self, value: Tensor) -> Tensor:
        from accelerate.utils import reduce

        value = torch.as_tensor(value)
        return reduce(value.to(self.device), "sum").to(value.device)

    def gather(self, tensor: Tensor) -> Tensor:
        from accelerate.utils import gather

        return gather(tensor.contiguous().to(self.device)).to(tensor.device)

    def local(self, gathered: Tensor) -> Tensor:
        n = gathered.shape[0] // self.world_size
        return gathered[self.rank * n: (self.rank + 1) * n]

    def gather_rows(self, tensor: Tensor, counts: Sequence[int]) -> Tensor:
        from accelerate.utils import gather, pad_across_processes

        if tensor.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank} holds {tensor.shape[0]} rows, expected {counts[self.rank]}")
        padded = pad_across_processes(tensor.contiguous().to(self.device), dim=0)
        blocks = gather(padded).to(tensor.device).split(padded.shape[0])
        return torch.cat([block[:k] for block, k in zip(blocks, counts)])

    def reduce_steps(self, rows: list[dict[str, float]], summed: Sequence[str], maxed: Sequence[str]) -> list[dict[str, float]]:
        keys = [sorted(row) for row in rows]  # the same on every process: the same plan and objective
        flat = torch.tensor([row[k] for row, ks in zip(rows, keys) for k in ks], dtype=torch.float64)
        every = self.gather(flat).view(self.world_size, -1)
        out, i = [], 0
        for ks in keys:
            row = {}
            for k in ks:
                col = every[:, i]
                row[k] = float(col.sum() if k in summed else col.max() if k in maxed else col.mean())
                i += 1
            out.append(row)
        return out

    def agree_stop(self, signum: int | None) -> int | None:
        every = self.gather(torch.tensor([signum or 0], dtype=torch.long))
        top = int(every.max())
        return top or None

    def check_faults(self, error: Exception | None, iteration: int) -> None:
        from tmpo.faults import NonFiniteError, PeerFailure

        kind = 0 if error is None else 1 if isinstance(error, NonFiniteError) else 2
        flags = self.gather(torch.tensor([kind], dtype=torch.long)).tolist()
        ranks = [r for r, f in enumerate(flags) if f]
        if not ranks:
            return
        if max(flags) == 1:  # only non-finite values: each process's own message, the others name them
            if error is not None:
                raise error
            raise NonFiniteError(f"process(es) {ranks} of {self.world_size} hit a non-finite rollout or reward at "
                                 f"iteration {iteration} (their logs name it); every process stops there")
        own = f"this process (rank {self.rank}) failed: {type(error).__name__}: {error}; " if error is not None else ""
        raise PeerFailure(f"iteration {iteration}: {own}process(es) {ranks} of {self.world_size} failed while rolling "
                          "out or scoring (their logs name the error); every process stops there") from error

    def prepare(self, policy: nn.Module) -> None:
        # device_placement=False: the policy placed its modules itself (model.device; ``cuda`` is this
        # process's GPU, set by accelerate before the model was built)
        self._ddp = self.accelerator.prepare_model(policy.net, device_placement=False)

    @contextlib.contextmanager
    def backward(self, policy: nn.Module, last: bool) -> Iterator[None]:
        if self._ddp is None:
            raise RuntimeError("AcceleratedProcesses.prepare(policy) must run before the first update")
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self._ddp)
        with policy.forward_through(self._ddp), sync:
            yield

    def reduce_grads(self, params: Sequence[Tensor]) -> None:
        from accelerate.utils import reduce

        for p in params:
            if p.grad is not None:
                p.grad.copy_(reduce(p.grad.to(self.device), "mean").to(p.grad.device))


def _check_launch_settings() -> None:
    """Refuse accelerate settings the loop does not follow (one clear error instead of a silent change)."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", "fp32"):
        raise ValueError(f"accelerate launch --mixed_precision {mp}: tmpo sets precision itself (model.dtype=bf16 runs "
                         "the transformer in bf16, LoRA weights and log-probs stay float32); launch with "
                         "--mixed_precision no (conf/accelerate/ddp.yaml)")
    for flag, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "false").lower() == "true":
            raise ValueError(f"accelerate launch with {what}: not supported -- the loop reads and writes the full LoRA "
                             "weights outside the forward pass (EMA, reference adapter, checkpoints, export); use "
                             "DDP (conf/accelerate/ddp.yaml). README 'Reproducing the paper on GPUs' explains why DDP fits")


def submitit_tasks() -> int:
    """How many tasks the submitit job this process belongs to has (0 outside submitit)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    from submitit import JobEnvironment

    return int(JobEnvironment().num_tasks)


def from_environment() -> Processes:
    """The processes this run is one of.

    * ``accelerate launch`` (or torchrun) with ``WORLD_SIZE > 1``: :class:`AcceleratedProcesses`;
    * a submitit job with several tasks (``hydra/launcher=slurm``: one task per GPU): the tasks' SLURM
      ranks are exported as torch.distributed's environment (``submitit.helpers.TorchDistributedEnvironment``,
      every task keeping all of the node's GPUs visible), then the same;
    * otherwise the single process.
    """
    if "WORLD_SIZE" not in os.environ and submitit_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if env.rank == 0:
            _log.info("submitit job of %d tasks: torch.distributed via %s:%d", env.world_size, env.master_addr, env.master_port)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return AcceleratedProcesses()
    return Processes()


def log_to_rank_file(rank: int) -> None:
    """Rank ``r > 0`` logs to ``run.rank<r>.log`` instead of the run's ``run.log`` (Hydra opens the same
    file in every process), and to the console only from WARNING up."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename)
            root.removeHandler(handler)
            handler.close()
            rank_file = logging.FileHandler(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
            rank_file.setFormatter(handler.formatter)
            rank_file.setLevel(handler.level)
            root.addHandler(rank_file)
        elif isinstance(handler, logging.StreamHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


class SilentLogger:
    """The run logger of ranks ``> 0``: only rank 0 writes metrics.jsonl, summary.json and wandb."""

    rows = None
    wandb_id = None

    def log(self, metrics: dict, step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int, caption: str | None = None) -> None: ...

    def summary(self, metrics: dict) -> None: ...

    def resume_at(self, step: int, rows: int | None = None) -> None: ...

    def restart(self) -> None: ...

    def finish(self, preempting: bool = False) -> None: ...


def shared_run_dir_overrides(argv: Sequence[str]) -> list[str]:
    """Overrides that make every process of an ``accelerate launch`` use one run directory.

    Each process composes its own Hydra config, and the default run dir holds the start time to the
    second, which processes would not agree on: rank 0's time is broadcast and fixed on the command line
    (unless ``hydra.run.dir`` / ``hydra.sweep.dir`` is given). Ranks ``> 0`` write no ``.hydra/`` copy of
    the config. Nothing changes for a single process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    import time

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())  # the process group Accelerator reuses later
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S") if state.is_main_process else None]
    broadcast_object_list(stamp)
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir=${{tmpo_run_dir:${{resume}},'outputs/${{method}}/{stamp[0]}'}}")
    if not any(a.startswith("hydra.sweep.dir=") for a in argv):
        extra.append(f"hydra.sweep.dir=multirun/{stamp[0]}")
    if not state.is_main_process:
        extra.append("hydra.output_subdir=null")
    return extra
