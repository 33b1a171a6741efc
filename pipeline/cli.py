"""One CLI; each subcommand is one DVC stage (plus `demo`). Stage modules are imported lazily
so that `train` and `evaluate` never import torch."""

from __future__ import annotations

import argparse
import atexit
import errno
import importlib
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

from pipeline.config import ConfigError, load
from pipeline.outputs import Outputs

log = logging.getLogger("pipeline")

STAGES = {
    "scan": "read new images once; the data's files and digest -> cache/data.json (what the manifest depends on)",
    "manifest": "list dataset folders -> cache/manifest.parquet (digests, videos, splits)",
    "extract": "embed images that the cache lacks -> cache/embeddings/<model>/, cache/extract.json",
    "train": "fit a linear probe on cached embeddings -> models/probe/",
    "evaluate": "score fake test sets with held-out reals -> metrics/, plots/, reports/",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="The stages of dvc.yaml, one command each (`dvc repro` runs them in order and only where "
        "their inputs changed), and the tools around the cache they fill.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if name == "extract":
            p.add_argument("--retry-failed", action="store_true", help="try images recorded as failed again")
    predict = sub.add_parser("predict", help="score image and video files, or folders, with a trained probe -> CSV")
    predict.add_argument("paths", nargs="+", type=Path, help="image or video files, or folders of them")
    predict.add_argument("--probe", type=Path, default=None, help="probe directory (default: models/probe)")
    predict.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    predict.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    cache = sub.add_parser(
        "cache", help="inspect (info), re-check (verify), repair or re-compute a sample of (check) the embedding caches"
    )
    cache.add_argument(
        "action",
        choices=["info", "verify", "repair", "check"],
        help="info: what each cache holds; verify: re-check every shard; "
        "repair: drop damaged or missing shards so the next extract re-embeds their rows; "
        "check: re-embed a sample of the current cache's rows on this machine and compare",
    )
    cache.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    cache.add_argument("--rows", type=int, default=16, help="check: rows to re-embed (default: 16)")
    cache.add_argument("--seed", type=int, default=0, help="check: which rows (default: 0)")
    show = sub.add_parser("show", help="print the evaluate stage's metrics as tables (one per protocol)")
    show.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    compare = sub.add_parser(
        "compare", help="compare the workspace and every DVC experiment: AUC per test set, with significance"
    )
    compare.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    compare.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples (default: 1000)")
    demo = sub.add_parser("demo", help="write the synthetic demo dataset and a tiny random-weight CLIP")
    demo.add_argument("--params", default="params.yaml", help="accepted for symmetry; the demo ignores it")
    demo.add_argument("--data-dir", default="data/demo", type=Path, help="where to write images (default: data/demo)")
    demo.add_argument("--model-dir", default="data/tiny-clip", type=Path, help="where to save the model")
    demo.add_argument("--videos", type=int, default=40, help="real videos (default: 40)")
    demo.add_argument("--frames", type=int, default=8, help="frames per video (default: 8)")
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.add_argument(
        "--video", action="store_true", help="write the video demo (FF++'s video layout, a real face) to --data-dir"
    )
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run one subcommand; returns the exit code. Outputs go beside the params file."""
    if args.command == "demo":
        from pipeline import demo

        if args.video:
            demo.run_video(args.data_dir, args.model_dir, force=args.force)
        else:
            demo.run(args.data_dir, args.model_dir, n_videos=args.videos, frames=args.frames, force=args.force)
        return 0
    settings = load(args.params)
    outputs = Outputs(settings.base_dir)
    if args.command in ("extract", "predict") or (args.command == "cache" and args.action == "check"):
        idle_openmp_threads_sleep()  # before torch is imported
    if args.command == "predict":
        from pipeline import predict

        predict.run(settings, outputs, args.paths, args.probe, args.out)
        return 0
    if args.command == "cache" and args.action == "check":
        from pipeline import check

        if args.rows < 1:
            raise ConfigError(f"--rows is {args.rows}; check at least 1 row.")
        return check.run(settings, outputs, args.rows, args.seed)
    if args.command == "cache":
        from pipeline import cache_report

        return cache_report.run(outputs, args.action)
    if args.command == "compare":
        from pipeline import compare

        print(compare.run(outputs, n=args.resamples))
        return 0
    if args.command == "show":
        from pipeline import report

        for title, text in report.summaries(report.read_metrics(outputs)).items():
            print(f"{title}\n{text}\n")
        return 0
    stage = importlib.import_module(f"pipeline.{args.command}")
    if args.command == "extract":
        stage.run(settings, outputs, retry_failed=args.retry_failed)
    else:
        stage.run(settings, outputs)
    return 0


def idle_openmp_threads_sleep() -> None:
    """OpenMP threads that finish their share of an operation sleep at once (`OMP_WAIT_POLICY=
    PASSIVE`) instead of spinning for the next one (GNU OpenMP, torch's, spins 300,000 rounds
    first). Set for `extract` and `predict` before they import torch: OpenMP reads it once, as it
    loads. On a CPU the model's threads meet after every operation, and between operations (while
    Python dispatches the next) spinning threads held the cores on which the readers, at nice 19,
    could have decoded: on 2 cores with AMX (ViT-B/32 in bf16, `benchmarks/extract_bench.py`, 600
    images, eight runs each, alternating) the extractor waited for its readers 0.29-0.45 s of about
    9 s instead of 0.69-0.83 s, and b/c rose from 0.78-0.92 (mean 0.85) to 0.86-0.97 (mean 0.91);
    the forward pass alone ran at the same rate either way, and so did the extractor capped at
    AVX2, in fp32 (b/c 0.96 and 0.95). A policy the user set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (`stop_on_sigterm`)."""


def _terminated(signum: int, frame) -> None:
    if not _taken_later(signum):
        raise Terminated


def _interrupted(signum: int, frame) -> None:
    if not _taken_later(signum):
        raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM stops a stage as Ctrl-C does. It is how a run is stopped where nobody is at the
    keyboard: a batch system's time limit (SLURM sends it to every process of the job, then
    SIGKILL after a grace period), `timeout`, `docker stop`, an evicted pod. Python's default
    ends the process at once: extract lost what its writer had buffered (up to a shard of
    `extract.shard_size` images: minutes of a CPU's work), and DataLoader workers that got it too
    made the run fail with "killed by signal". Now the writer commits what is buffered, and the
    DataLoader workers stop quietly (`embedder._end_quietly`), as on Ctrl-C. Both stops wait for
    a progress bar's redraw (`_taken_later`); Ctrl-C keeps Python's handling where it was
    ignored (`nohup`, a background job). Installed by `python -m pipeline` (`__main__`), not by
    `main` called in a process that is not ours."""
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


REDRAW_WAIT = 0.01  # seconds after which a stop that came during a progress bar's redraw is taken again
REDRAW_WAITS = 100  # times at most (1 s): a lock held longer was left held before, by someone else
_postponed = 0


def _taken_later(signum: int) -> bool:
    """Whether the stop `signum` is put off for REDRAW_WAIT because this thread (the main one,
    where Python runs signal handlers) is redrawing a progress bar: tqdm holds the lock every bar
    shares while it draws, with no try/finally (`tqdm.refresh`), so a stop raised there left the
    lock held for the rest of the process, and the next bar of any other thread waited for it
    forever (a dask client's progress on its event loop: the stopped stage never ended). The
    signal is sent again, and taken once the redraw is done."""
    global _postponed
    if _postponed >= REDRAW_WAITS or not _holding_progress_lock():
        _postponed = 0
        return False
    _postponed += 1
    again = threading.Timer(REDRAW_WAIT, os.kill, (os.getpid(), signum))
    again.daemon = True  # a stage that ends within REDRAW_WAIT ends as it would have: its work is done
    again.start()
    return True


def _holding_progress_lock() -> bool:
    """Whether this thread holds a lock that every tqdm bar shares (tqdm's default write lock: a
    thread lock and, where fork is, a multiprocessing one, taken in turn)."""
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is None:
        return False
    shared = tqdm.TqdmDefaultWriteLock
    try:
        return bool(
            (shared.th_lock is not None and shared.th_lock._is_owned())
            or (getattr(shared, "mp_lock", None) is not None and shared.mp_lock._semlock._is_mine())
        )
    except AttributeError:  # another tqdm whose locks are built otherwise: nothing to wait for
        return False


def end_with_dvc() -> None:
    """As a DVC stage (DVC sets DVC_STAGE), end with the `dvc` that ran it, as on SIGTERM. A SIGTERM
    that reaches DVC alone (`timeout 8h dvc repro`, `kill <dvc>`, `docker stop`) ends DVC, which
    leaves SIGINT to its stage and SIGTERM to nobody: the stage ran on orphaned, writing into the
    cache and holding its lock while the user started again, and in a container was SIGKILLed at
    the teardown with what it had buffered. DVC runs the command in `$SHELL -c` (`/bin/sh -c`
    where SHELL is unset: CI, cron, containers); bash hands a one-command stage its place, while
    dash stays between and waits, outliving DVC too, so the stage watches DVC itself (`_dvc_pid`),
    not its parent. Outside DVC (a user's shell, `nohup`) a stage outlives its parent, as it
    should."""
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    threading.Thread(target=_terminate_after, args=(_dvc_pid(),), name="end-with-dvc", daemon=True).start()


def _dvc_pid() -> int:
    """The nearest process above this one that is not part of the stage: the processes DVC starts
    for a stage (its shell, and the shell's) have the stage's DVC_STAGE in their environment, DVC
    has not. It may be 1 (`docker run <image> dvc repro`: DVC is the container's first process).
    Once DVC has ended: 1 or a subreaper, to which its children were handed on. 0 when none is."""
    pid, stage = os.getppid(), os.environ["DVC_STAGE"].encode()
    while pid > 0:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"DVC_STAGE=" + stage not in environ:
                return pid
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone, or another user's
            return pid
        pid = int(stat.rpartition(")")[2].split()[1])  # the field after the state; the name may hold ")"
    return pid


def _terminate_after(dvc: int) -> None:
    """SIGTERM to this process once `dvc` has ended: at once where Linux hands out a pidfd (5.3 and
    newer), within a second where not (the walk up `_dvc_pid` no longer meets it, since its
    children were handed on). Opened first, then checked: a pidfd of a pid DVC no longer holds
    is never waited on."""
    if dvc == 0:  # DVC_STAGE set, and nothing above without it: no DVC to end with
        return
    try:
        ended = os.pidfd_open(dvc)
    except (AttributeError, OSError):  # ended already (ESRCH), or an older kernel (ENOSYS)
        ended = None
    if _dvc_pid() == dvc:
        if ended is not None:
            select.select([ended], [], [])
        else:
            while _dvc_pid() == dvc:
                time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def what_a_stop_keeps(args: argparse.Namespace) -> str:
    """What a stopped command leaves, and what to do: only extract and predict commit shards and
    resume (`evaluate` said "committed shards are kept ... to resume" too)."""
    if args.command in ("extract", "predict"):
        return "committed shards are kept; run the same command again to resume."
    if args.command == "scan":
        return "the files read so far are remembered; run the same command again to read the rest."
    return "run the same command again."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = dispatch(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"terminated (SIGTERM): {what_a_stop_keeps(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"interrupted: {what_a_stop_keeps(args)}", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder, an I/O error: one line, nothing lost
        print(f"error: {os_error_sentence(exc)}", file=sys.stderr)
        return 1
    return code


def leave(code: int) -> None:
    """End `python -m pipeline` with `code` without Python's teardown of every imported module:
    once torch and transformers are imported, that teardown alone takes about a second, and every
    `dvc repro` pays it per stage (measured in BENCHMARKS.md, "A stage's exit"). What the normal
    exit does for this process's work still happens: thread pools left open are stopped and
    threads that are not daemons are joined, the atexit handlers run (multiprocessing's, which
    stops DataLoader workers; logging's flush; `weakref.finalize`'s, which removes temporary
    folders), and stdout and stderr are flushed.
    Everything a stage writes is closed before `main` returns (atomic writes, the shard writer's
    close). Under a profiler, a tracer or coverage (`python -m cProfile -m pipeline ...`), which
    write what they measured at the normal exit, the exit is the normal one. Not for `main()`
    called in-process (tests): it ends the interpreter. A stop (Ctrl-C, SIGTERM) that comes now,
    after the stage's work, ends the process at once with `code`, output flushed: it printed
    "Exception ignored in atexit callback ... KeyboardInterrupt" from whichever handler it
    interrupted."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    # A stop from now on (Ctrl-C, SIGTERM) comes after the stage's work: it ends the process at once.
    for stop in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(stop) in (_terminated, _interrupted):
            signal.signal(stop, lambda signum, frame: os._exit(_flushed(code)))
    # What Py_Finalize runs first, in its order; the module teardown after them is skipped.
    threading._shutdown()  # stops idle thread pools left open, then joins the non-daemon threads
    atexit._run_exitfuncs()
    os._exit(_flushed(code))


def _flushed(code: int) -> int:
    """`code`, once stdout and stderr are flushed; 120 for a stage that exited 0 but whose output
    could not be written (a closed pipe, a full disk), as Python's own exit says."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a stop in the middle of a flush
            code = code or 120
    return code


def os_error_sentence(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}; free space and rerun: finished shards and outputs are kept."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}; make it writable (or readable) and rerun: finished shards are kept."
    return f"{exc.strerror or exc}{where}; fix the cause and rerun: finished shards are kept."
