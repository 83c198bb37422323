"""``dictlearn jobs``: list, inspect, tail and stop the jobs on a Ray cluster.

    dictlearn jobs list --address http://127.0.0.1:8265
    dictlearn jobs status JOB_ID --address http://127.0.0.1:8265
    dictlearn jobs logs JOB_ID --address http://127.0.0.1:8265 [--follow]
    dictlearn jobs stop JOB_ID --address http://127.0.0.1:8265 [--no-wait]

``--address`` defaults to ``$RAY_API_SERVER_ADDRESS``, then ``$RAY_ADDRESS``. Nothing here prints
a job's runtime environment (it holds the forwarded W&B key).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from launch.submit import ClusterError, address_argument, cluster_errors, connect

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def describe(job: JobDetails) -> tuple[str, str]:
    """``(stage, config)`` of a job: from dictlearn's metadata, else from its command line."""
    meta = job.metadata or {}
    if "dictlearn_stage" in meta:
        return meta["dictlearn_stage"], meta.get("dictlearn_config", "?")
    try:
        words = shlex.split(job.entrypoint)
    except ValueError:
        words = []
    words = words[words.index("dictlearn") :] if "dictlearn" in words else []
    if len(words) >= 3:
        return words[1], words[2]
    command = job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "..."
    return "-", command


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(job: JobDetails) -> str:
    if not job.start_time:
        return "-"
    end = job.end_time or time.time() * 1000
    seconds = int((end - job.start_time) / 1000)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """Submitted jobs (not interactive drivers), oldest first."""
    jobs = [job for job in client.list_jobs() if job.submission_id]
    return sorted(jobs, key=lambda job: job.start_time or 0)


def jobs_table(jobs: list[JobDetails]) -> str:
    """A compact table: id, status, start time, run time, stage, config."""
    header = ("ID", "STATUS", "STARTED", "TIME", "STAGE", "CONFIG")
    rows = [header] + [
        (
            job.submission_id or "-",
            str(job.status),
            _when(job.start_time),
            _duration(job),
            *describe(job),
        )
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    )


def status_text(job: JobDetails) -> str:
    """The fields of one job worth reading (never its runtime environment)."""
    stage, config = describe(job)
    lines = [
        f"job         {job.submission_id}",
        f"status      {job.status}",
        f"stage       {stage}",
        f"config      {config}",
        f"command     {job.entrypoint}",
        f"started     {_when(job.start_time)}",
        f"ended       {_when(job.end_time)}",
        f"time        {_duration(job)}",
    ]
    if job.driver_exit_code is not None:
        lines.append(f"exit code   {job.driver_exit_code}")
    if job.message:
        lines.append(f"message     {job.message.strip().splitlines()[-1]}")
    return "\n".join(lines)


def wait_until_done(
    client: JobSubmissionClient, job_id: str, timeout_s: float, poll_s: float = 0.5
) -> str | None:
    """The job's terminal status, or None if it is still going after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


async def _tail(client: JobSubmissionClient, job_id: str) -> str:
    """Print the job's output as it comes, until the job ends; returns the last chunk."""
    last = ""
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
        last = lines or last
    return last


# ----------------------------------------------------------------------------------------------
# CLI


def jobs_arguments(p: argparse.ArgumentParser) -> None:
    """``dictlearn jobs {list,status,logs,stop}``, each with ``--address``."""
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    address_argument(actions.add_parser("list", help="Jobs on the cluster, oldest first."))
    for name, help_text in (
        ("status", "A job's status, command and times."),
        ("logs", "A job's output so far."),
        ("stop", "Stop a job (SIGTERM: a trainer checkpoints, then exits)."),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("job_id", metavar="JOB_ID", help="The id `dictlearn submit` printed.")
        address_argument(action)
        if name == "logs":
            action.add_argument(
                "--follow", "-f", action="store_true", help="Keep printing until the job ends."
            )
        if name == "stop":
            action.add_argument(
                "--no-wait", action="store_true", help="Return once the stop is requested."
            )
            action.add_argument(
                "--timeout",
                type=float,
                default=300,
                metavar="SECONDS",
                help="How long to wait for the job to end (default 300).",
            )


def run_jobs(args: argparse.Namespace) -> Any:
    """The ``jobs`` command's handler."""
    client, address = connect(args.address)
    job_id = getattr(args, "job_id", None)
    with cluster_errors(address, job_id):
        if args.action == "list":
            jobs = list_jobs(client)
            print(jobs_table(jobs) if jobs else f"no jobs on {address}")
            return jobs
        job = client.get_job_info(job_id)  # an unknown id fails here, with a clear message
        if args.action == "status":
            print(status_text(job))
        elif args.action == "logs":
            if args.follow:
                # Ray logs "WebSocket closed" at INFO when the job ends: noise here.
                logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
                try:
                    last = asyncio.run(_tail(client, job_id))
                except KeyboardInterrupt:
                    print(f"\n[stopped following; job {job_id} goes on]", file=sys.stderr)
                    return job
                if last and not last.endswith("\n"):
                    print()
                print(f"[job {job_id} {client.get_job_status(job_id)}]", file=sys.stderr)
            else:
                sys.stdout.write(client.get_job_logs(job_id))
        elif args.action == "stop":
            _stop(client, job, args.no_wait, args.timeout)
        return job


def _stop(client: JobSubmissionClient, job: JobDetails, no_wait: bool, timeout_s: float) -> None:
    job_id = job.submission_id
    if str(job.status) in TERMINAL:
        print(f"job {job_id} already {job.status}; nothing to stop")
        return
    client.stop_job(job_id)
    if no_wait:
        print(f"stop requested for job {job_id}")
        return
    print(f"stopping job {job_id} (SIGTERM: a trainer writes a checkpoint, then exits)")
    status = wait_until_done(client, job_id, timeout_s)
    if status is None:
        raise ClusterError(
            f"job {job_id} did not end within {timeout_s:.0f} s of the stop request; "
            f"check `dictlearn jobs status {job_id} --address {client.get_address()}`"
        )
    print(f"job {job_id} {status}")
