"""Run one training function on several processes with ``torchrun``, and follow it from the caller.

Two sides of one contract, both in this module so they cannot drift apart:

* the caller (the CLI, a worker task) calls :func:`launch`: it writes the run's ``spec.json`` into a run
  folder, starts ``python -m torch.distributed.run ... -m models.launch spec.json`` (torchrun is torch's
  launcher: rendezvous, one process per rank, and when one rank dies it stops the others and exits
  non-zero), relays rank 0's progress to ``on_step`` and, when ``on_step`` raises
  :class:`~models.callbacks.Canceled`, asks the ranks to stop at their next step (they checkpoint first);
* every rank runs :func:`main`: it joins the process group (:func:`models.distributed.init_from_env`)
  and calls the registered training function (:data:`TASKS`) exactly as one process would; rank 0 writes
  ``progress.json`` each step, polls the ``cancel`` file and writes ``result.json`` at the end.

The run folder (``progress.json``, ``cancel``, ``result.json``, ``torchrun.log``) lives beside the
checkpoints, on a disk the caller and rank 0 share. A failed rank surfaces as
:class:`DistributedRunError` with torchrun's root-cause report (rank, exit code, signal or traceback);
the checkpoint stays, so the same call with ``resume=True`` continues, with this or another world size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from models.callbacks import Canceled, OnStep, no_progress
from models.distributed import init_from_env, shutdown
from models.torchrun import LaunchOptions, torchrun_command

SPEC_FORMAT = "cxrsynth-launch/1"
POLL_SECONDS = 0.5


class DistributedRunError(RuntimeError):
    """A rank of a torchrun run failed; the message carries torchrun's root-cause report."""


def _run_pretrain(spec: dict[str, Any], device: str, on_step: OnStep) -> Any:
    from models.ssl.config import PretrainConfig
    from models.ssl.training import pretrain

    return pretrain(spec["data"], PretrainConfig.from_dict(spec["config"]), spec["out_dir"],
                    checkpoint_dir=spec["checkpoint_dir"], resume=spec["resume"], on_step=on_step, device=device,
                    notes=spec.get("notes", ""))


def _run_generator(spec: dict[str, Any], device: str, on_step: OnStep) -> Any:
    from models.diffusion.config import TrainingConfig
    from models.diffusion.training import train_generator

    return train_generator(spec["data"], spec["out_dir"], TrainingConfig.from_dict(spec["config"]),
                           checkpoint_dir=spec["checkpoint_dir"], resume=spec["resume"], on_step=on_step,
                           device=device, init_from=spec.get("init_from"))


def _run_latent_generator(spec: dict[str, Any], device: str, on_step: OnStep) -> Any:
    from models.diffusion.latent import LatentGeneratorConfig, train_latent_generator

    return train_latent_generator(spec["data"], spec["out_dir"], LatentGeneratorConfig.from_dict(spec["config"]),
                                  checkpoint_dir=spec["checkpoint_dir"], resume=spec["resume"], on_step=on_step,
                                  device=device, init_from=spec.get("init_from"))


# The training functions a torchrun run can execute, by name; an unknown name fails loudly.
TASKS: dict[str, Callable[[dict[str, Any], str, OnStep], Any]] = {
    "pretrain": _run_pretrain,
    "train_generator": _run_generator,
    "train_latent_generator": _run_latent_generator,
}


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The files through which the caller and rank 0 talk."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def cancel(self) -> Path:
        return self.root / "cancel"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def log(self) -> Path:
        return self.root / "torchrun.log"


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The caller's side
# --------------------------------------------------------------------------------------------------
def make_spec(task: str, *, data: str | Path, out_dir: str | Path | None, config: dict[str, Any],
              checkpoint_dir: str | Path | None, resume: bool, device: str = "auto",
              init_from: str | Path | None = None, notes: str = "") -> dict[str, Any]:
    """The JSON description of one training call (``task`` is a key of :data:`TASKS`)."""
    if task not in TASKS:
        raise ValueError(f"unknown launch task {task!r}; known: {', '.join(TASKS)}")
    return {"format": SPEC_FORMAT, "task": task, "data": str(data),
            "out_dir": None if out_dir is None else str(out_dir), "config": config,
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir), "resume": bool(resume),
            "device": device, "init_from": None if init_from is None else str(init_from), "notes": notes}


def _rank_environment(options: LaunchOptions, device: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The ranks' environment: on CPU the cores are shared out (torchrun would give each rank 1 thread)."""
    env = {**os.environ, **(extra or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu" or (device == "auto" and not _cuda_available()):
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc_per_node)))
    return env


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def root_cause(log_text: str, limit: int = 1500, context_lines: int = 20) -> str:
    """torchrun's "Root Cause" report of a failed run (rank, exit code, signal, traceback), else the log's tail.

    A rank killed by a signal (a C++ abort, the OOM killer) has no Python traceback in the report, only
    ``traceback : Signal N``: the ranks' last output lines before the report (e.g. ``terminate called after
    throwing ...``) are then appended, because they are the only trace of what went wrong.
    """
    marker = log_text.rfind("Root Cause")
    if marker < 0:
        return log_text[-limit:].strip()
    block = log_text[marker:]
    end = block.find("=" * 20)  # torchrun closes the report with a rule of '='
    report = (block[:end] if end > 0 else block).strip()[-limit:]
    if "traceback : Signal" not in report:
        return report
    # What precedes the report: the ranks' output, then torchrun's own "failed (exitcode: ...)" log line
    # and launcher traceback, which say nothing new and are cut off.
    head = log_text[:marker]
    cut = head.find("failed (exitcode")
    head = head[:head.rfind("\n", 0, cut) + 1] if cut >= 0 else head[:head.rfind("=" * 20) + 1]
    before = [line for line in head.splitlines() if line.strip() and set(line.strip()) != {"="}][-context_lines:]
    if not before:
        return report
    return report + "\n\nlast output of the ranks before the report:\n" + "\n".join(before)[-limit:]


def _relay(files: RunFiles, last: tuple[int, int, str] | None, on_step: OnStep) -> tuple[int, int, str] | None:
    """Pass rank 0's latest progress to ``on_step`` when it changed."""
    try:
        p = json.loads(files.progress.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return last
    now = (int(p["step"]), int(p["total"]), str(p["message"]))
    if now != last:
        on_step(*now)
    return now


def _follow(proc: subprocess.Popen[bytes], files: RunFiles, on_step: OnStep) -> bool:
    """Relay progress until the ranks exit; True when ``on_step`` asked to cancel."""
    last: tuple[int, int, str] | None = None
    canceled = False
    while proc.poll() is None:
        try:
            last = _relay(files, last, on_step if not canceled else no_progress)
        except Canceled:
            canceled = True
            files.cancel.touch()
        time.sleep(POLL_SECONDS)
    if not canceled:
        try:
            _relay(files, last, on_step)
        except Canceled:
            canceled = True
    return canceled


def launch(spec: dict[str, Any], options: LaunchOptions, run_dir: str | Path,
           on_step: OnStep = no_progress, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Run ``spec`` on ``options.world_size`` ranks with torchrun; rank 0's result record.

    Blocks until every rank on this machine has exited. Returns the result written by rank 0 (``None`` on
    a machine that does not host rank 0). Raises :class:`Canceled` when ``on_step`` did (after the ranks
    checkpointed and stopped) and :class:`DistributedRunError` when a rank failed. If this process is
    interrupted, the ranks are stopped with it. ``env`` adds to the ranks' environment (e.g.
    ``CUDA_VISIBLE_DEVICES``).
    """
    files = RunFiles(Path(run_dir))
    files.root.mkdir(parents=True, exist_ok=True)
    for stale in (files.progress, files.cancel, files.result):
        stale.unlink(missing_ok=True)
    _write_json_atomic(files.spec, spec)
    cmd = torchrun_command(options, ["-m", "models.launch", str(files.spec)])
    with open(files.log, "wb") as log:
        # Its own session: stopping this caller (SIGTERM, Ctrl-C) stops the whole torchrun group below.
        rank_env = _rank_environment(options, spec["device"], env)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env, start_new_session=True)
        try:
            canceled = _follow(proc, files, on_step)
        except BaseException:
            _stop(proc)
            raise
    if proc.returncode != 0:
        raise DistributedRunError(f"distributed {spec['task']} failed (torchrun exit {proc.returncode}, "
                                  f"{options.world_size} ranks); the checkpoint is kept, resume to continue:\n"
                                  f"{root_cause(files.log.read_text(errors='replace'))}")
    result: dict[str, Any] | None = json.loads(files.result.read_text()) if files.result.is_file() else None
    if canceled or (result is not None and result.get("status") == "canceled"):
        raise Canceled()
    return result


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM torchrun's process group (it forwards to the ranks), SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------------
# Every rank's side
# --------------------------------------------------------------------------------------------------
def _rank0_progress(files: RunFiles) -> OnStep:
    """Rank 0's ``on_step``: publish the step, and raise :class:`Canceled` once the caller asked."""

    def on_step(step: int, total: int, message: str) -> None:
        _write_json_atomic(files.progress, {"step": step, "total": total, "message": message})
        if files.cancel.exists():
            raise Canceled()

    return on_step


def _jsonable(result: Any) -> dict[str, Any]:
    is_record = dataclasses.is_dataclass(result) and not isinstance(result, type)
    record = dataclasses.asdict(result) if is_record else dict(result)
    return json.loads(json.dumps(record, default=str))


def run_rank(spec_path: str | Path) -> None:
    """Run the spec's task on this rank (what ``python -m models.launch SPEC`` does under torchrun)."""
    files = RunFiles(Path(spec_path).parent)
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{spec_path} is not a launch spec (format {spec.get('format')!r})")
    task = TASKS.get(spec["task"])
    if task is None:
        raise ValueError(f"unknown launch task {spec['task']!r}; known: {', '.join(TASKS)}")
    w, device = init_from_env(spec["device"])
    finished = False  # done or canceled: every rank got here at the same step (models.distributed.agree)
    try:
        try:
            result = task(spec, device, _rank0_progress(files) if w.main else no_progress)
            record = {"status": "done", **_jsonable(result)}
        except Canceled:
            record = {"status": "canceled"}
        if w.main:
            _write_json_atomic(files.result, {**record, "world_size": w.size})
        finished = True
    finally:
        shutdown(barrier=finished)


def main(argv: list[str] | None = None) -> None:
    """Entry point of every rank: ``python -m models.launch SPEC.json``."""
    from torch.distributed.elastic.multiprocessing.errors import record

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m models.launch SPEC.json (started by torchrun, see models.launch.launch)")
    # torchrun's error recorder: a rank's exception lands in torchrun's root-cause report.
    record(run_rank)(args[0])


if __name__ == "__main__":
    main()
