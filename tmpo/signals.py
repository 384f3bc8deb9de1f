"""Preemption-safe stopping: a signal asks the loop to finish its iteration, checkpoint and exit.

SLURM (and most schedulers) warn a job before killing it: SIGTERM on preemption, a user signal
(``--signal=USR1@<s>``, submitit's USR2) before the time limit, SIGINT from a terminal. While
:class:`GracefulStop` is active these only set a flag; the loop checks it between iterations, writes
its checkpoint and raises :class:`Preempted`. The entry point then exits with :data:`REQUEUE_EXIT_CODE`
(the code on which submitit's local launcher restarts a job) or, inside a submitit job, hands over to
submitit's own requeue handler (``scontrol requeue`` on SLURM). SIGINT means "stop": exit
:data:`INTERRUPT_EXIT_CODE`, no requeue; a second SIGINT interrupts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, NoReturn

REQUEUE_EXIT_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE: its local controller restarts the job
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, the shell's convention for Ctrl-C
PREEMPT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))
_log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised by the loop after it checkpointed in response to a stop signal."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = int(signum), int(step), str(checkpoint)
        super().__init__(f"stopped by {signal_name(signum)} after iteration {step}; checkpoint {checkpoint}")

    @property
    def requeue(self) -> bool:
        """Preemption signals ask for a requeue; SIGINT is a person asking the run to stop."""
        return self.signum != signal.SIGINT


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Context manager turning SIGTERM/SIGUSR1/SIGUSR2/SIGINT into a stop request (``.signum``).

    Handlers are installed only in the main thread (Python delivers signals there) and the previous
    ones are restored on exit, so a submitit job gets its own handlers back for the requeue.
    """

    def __init__(self, signals: tuple[int, ...] = (*PREEMPT_SIGNALS, signal.SIGINT)) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
        if self.signum is None or self.signum == signal.SIGINT:  # a preemption outranks a Ctrl-C
            self.signum = signum
        what = "Ctrl-C again to abort without a checkpoint" if signum == signal.SIGINT else "then exit for requeue"
        _log.warning("received %s: finishing the current iteration, then checkpointing (%s)", signal_name(signum), what)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def submitit_preempt_signal() -> int | None:
    """The signal on which submitit's job handler checkpoints and requeues, if this is a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        from submitit.core.job_environment import JobEnvironment

        return int(JobEnvironment._usr_sig())
    except Exception:  # submitit missing or misconfigured: fall back to the plain exit code
        return None


def exit_after_stop(stop: Preempted) -> NoReturn:
    """Leave the process after a checkpointed stop (raises ``SystemExit``).

    SIGINT exits :data:`INTERRUPT_EXIT_CODE`. A preemption inside a submitit job calls submitit's own
    handler, which re-submits the job (local launcher: exit 144; SLURM: ``scontrol requeue``) or reports
    that the job ran out of requeues; elsewhere it exits :data:`REQUEUE_EXIT_CODE`.
    """
    if not stop.requeue:
        _log.warning("%s; continue it with resume=auto (same run dir) or resume=<run dir>", stop)
        raise SystemExit(INTERRUPT_EXIT_CODE)
    usr = submitit_preempt_signal()
    handler = signal.getsignal(usr) if usr is not None else None
    if callable(handler):
        _log.warning("%s; handing over to submitit to requeue the job", stop)
        handler(usr, None)  # submitit checkpoints the submission, requeues and exits
    _log.warning("%s; exiting with code %d for a requeue (rerun with resume=auto)", stop, REQUEUE_EXIT_CODE)
    raise SystemExit(REQUEUE_EXIT_CODE)
