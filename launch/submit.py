"""``dictlearn submit``: run a stage on a Ray cluster through the Ray Jobs API.

    dictlearn submit launch/configs/train_tpu_v5e_16.yaml --address http://127.0.0.1:8265
    dictlearn submit my_pipeline.yaml output_dir=gs://bucket/runs --address http://HEAD:8265
    dictlearn submit my_sweep.yaml output_dir=gs://bucket/sweeps --address http://HEAD:8265

The job runs ``dictlearn STAGE CONFIG [overrides]`` on the cluster's head node. What reaches the
cluster, and how:

* **Code and config**: this checkout's ``dictlearn/``, ``sharding/``, ``launch/``,
  ``scaling_laws/``, ``pyproject.toml``, ``uv.lock`` and ``README.md`` (the files the container
  image is built from) are uploaded as the job's Ray ``working_dir``; Ray puts it first on the
  job's ``PYTHONPATH``, so the job runs the code you have here, not the code the cluster was set
  up with. A config outside those directories is uploaded with them under ``submitted/``.
* **Dependencies**: the cluster's own environment, installed from the same ``uv.lock``
  (``uv sync --frozen`` on launcher VMs, ``infra/docker/Dockerfile`` on KubeRay) plus the
  accelerator's JAX runtime. Ray's ``uv``/``pip`` runtime environments would build a fresh
  environment per job from the lock and lose ``jax[tpu]``/``jax[cuda12]``, which the lock does
  not hold; after a dependency change, re-run ``ray up`` or rebuild the image.
* **Secrets**: ``WANDB_API_KEY`` from this shell reaches the job's driver process (the trainer,
  the pipeline coordinator) through a file in the upload that the job's command reads. Not
  through ``runtime_env`` env vars: Ray writes those, values included, to its
  ``runtime_env_agent.log`` on every node and returns them from the Jobs API. The key is never
  printed. The Ray token is Ray's own: ``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN``,
  ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.

Submitting the same config again starts a new job that resumes from the run's checkpoints (a
finished run does nothing); a second job of the same resolved config while one is still pending
or running is refused, so two trainers never write one checkpoint directory. ``dictlearn jobs
stop`` sends SIGTERM; the trainer checkpoints and exits, and Ray waits ``--stop-grace`` seconds
for it before SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlearn.config import ConfigError, apply_overrides, read_yaml, without_fields
from dictlearn.errors import MissingInputError, UserError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

STAGES = ("generate", "train", "pipeline", "sweep")

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the job needs of this checkout: the files infra/docker/Dockerfile builds the image from
# (tests/launch/test_submit.py keeps the two lists equal).
SHIPPED = (
    "pyproject.toml",
    "uv.lock",
    "README.md",
    "dictlearn",
    "sharding",
    "launch",
    "scaling_laws",
)
# Inside the shipped directories, never upload byte code or editor/OS litter.
SHIP_IGNORE = ("__pycache__", "*.pyc", ".DS_Store", "*.egg-info")
# A config from outside the shipped directories is uploaded here, inside the working_dir.
SUBMITTED_DIR = "submitted"
# Forwarded secrets, one file each, inside the working_dir (read by the job's command line).
SECRETS_DIR = ".dictlearn_secrets"

# Top-level keys that tell a stage's config apart. A train config has a ``train:`` section too
# (batch size, steps), so ``train:`` counts for the pipeline only when it holds train sections.
_STAGE_KEYS = {
    "generate": {"corpus", "hooks", "model"},
    "train": {"sae", "data", "optimizer"},
    "pipeline": {"generate", "stages"},
    "sweep": {"grid", "base"},
}
# Where a stage's Ray address lives: null would start a private local cluster inside the job.
_RAY_ADDRESS_FIELD = {
    "generate": "ray.address",
    "pipeline": "generate.ray.address",
    "sweep": "ray.address",
}
# Fields a stage fills in itself (the pipeline places each stage's outputs under output_dir).
_FILLED_IN = {
    "pipeline": ("train.run", "train.data.path", "generate.output.path"),
    "sweep": ("base.run",),
}
# Config keys that hold local paths or URLs, checked for relative paths before submitting.
_PATH_KEY = re.compile(r"^(path|paths|url|output_dir|gguf|safetensors|.*_(dir|path|url|file))$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # gs://..., builtin:..., memory://...

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # as `ray job`: the first one set wins
FORWARDED_SECRETS = ("WANDB_API_KEY",)
DEFAULT_STOP_GRACE_S = 120
ACTIVE = ("PENDING", "RUNNING")  # job states that still write to the run's outputs


class ClusterError(UserError):
    """The cluster is unreachable, refused us, or has no such job; the message names the fix.

    A ``ValueError``, so the CLI prints it as one line with exit status 2.
    """


@dataclass(frozen=True)
class Submission:
    """What ``dictlearn submit`` sent."""

    job_id: str
    address: str
    stage: str
    entrypoint: str
    config: str
    """The config file as given on the command line."""
    forwarded_env: tuple[str, ...]
    """Names (never values) of the secrets put into the job's environment."""


# ----------------------------------------------------------------------------------------------
# Cluster connection


def resolve_address(address: str | None) -> str:
    """``--address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS`` (as ``ray job``)."""
    for candidate in (address, *(os.environ.get(name) for name in ADDRESS_ENV)):
        if candidate:
            return candidate.rstrip("/")
    raise ClusterError(
        "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard; see "
        "infra/README.md for the ssh tunnel or port-forward) or set RAY_API_SERVER_ADDRESS"
    )


def _auth_fix() -> str:
    return (
        "export RAY_AUTH_MODE=token and give the cluster's token as RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
    )


@contextlib.contextmanager
def cluster_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs client's failures into one-line :class:`ClusterError` messages."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        what = (
            "needs a token and none was sent"
            if str(e.message).startswith("Authentication required")
            else "rejected the token sent"
        )
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise ClusterError(
            f"the Ray cluster at {address} uses token authentication and {what} "
            f"(RAY_AUTH_MODE is {mode}): {_auth_fix()}"
        ) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as e:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {address} ({type(e).__name__}): is the cluster up, "
            "and the dashboard tunnel (`ray dashboard CLUSTER.yaml`) or `kubectl port-forward` "
            "running? Pass its URL as --address http://HOST:8265"
        ) from None
    except RuntimeError as e:
        if job_id is not None and "status code 404" in str(e):
            raise ClusterError(
                f"no job {job_id!r} on {address}: `dictlearn jobs list --address {address}` "
                "shows the jobs there"
            ) from None
        raise


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A Jobs API client for ``address`` (see :func:`resolve_address`) and the address used."""
    address = resolve_address(address)
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if (
        os.environ.get("RAY_AUTH_MODE") == "token"
        and token_path
        and not os.environ.get("RAY_AUTH_TOKEN")
    ):
        # Ray aborts the whole process (no exception) on an unreadable token file.
        path = Path(token_path).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise ClusterError(
                f"RAY_AUTH_TOKEN_PATH={token_path} is missing or empty: {_auth_fix()}"
            )
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        return JobSubmissionClient(address), address


# ----------------------------------------------------------------------------------------------
# Config: stage, validation, what it needs on the cluster


def infer_stage(data: dict[str, Any], config: str) -> str:
    """The stage a config is for, from its top-level keys."""
    found = [stage for stage, keys in _STAGE_KEYS.items() if keys & data.keys()]
    train = data.get("train")
    if isinstance(train, dict) and _STAGE_KEYS["train"] & train.keys() and "pipeline" not in found:
        found.append("pipeline")
    if "pipeline" in found:
        # A pipeline's stage sections (generate:, train:) are not the stage configs themselves.
        found = [s for s in found if s == "pipeline" or not _STAGE_KEYS[s] & data.keys()]
    if len(found) == 1:
        return found[0]
    keys = ", ".join(sorted(data)) or "none"
    why = f"it looks like {' and '.join(found)}" if found else "no stage's keys are in it"
    raise ConfigError(
        f"cannot tell which stage {config} is for ({why}; top-level keys: {keys}): "
        f"pass --stage {{{','.join(STAGES)}}}"
    )


def load_stage_config(stage: str, config: str, overrides: list[str]) -> dict[str, Any]:
    """Validate ``config`` + ``overrides`` as the stage would; returns the resolved config."""
    from dictlearn.config import load_config

    if stage == "train":
        from dictlearn.train.config import load_train_config

        model: Any = load_train_config(config, overrides)
    elif stage == "generate":
        from dictlearn.activations.config import GenerateConfig

        model = load_config(GenerateConfig, config, overrides)
    elif stage == "pipeline":
        from launch.pipeline import load_pipeline_config

        model = load_pipeline_config(config, overrides)
    elif stage == "sweep":
        from launch.sweep import load_sweep_config

        model = load_sweep_config(config, overrides)
    else:
        raise ConfigError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    return model.model_dump(mode="json")


def relative_paths(data: Any, where: str = "") -> list[str]:
    """Dotted fields of a resolved config that hold relative local paths.

    On the cluster the job's working directory is a temporary copy of the upload, so a relative
    path would read nothing and write outputs that vanish with it.
    """
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{where}.{key}" if where else str(key)
            if _PATH_KEY.match(str(key)):
                values = value if isinstance(value, list) else [value]
                if any(isinstance(v, str) and _is_relative(v) for v in values):
                    found.append(name)
                    continue
            found += relative_paths(value, name)
    return found


def _is_relative(path: str) -> bool:
    return bool(path) and not (_URL.match(path) or path.startswith(("/", "~")))


def _get_dotted(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def config_digest(stage: str, resolved: dict[str, Any]) -> str:
    """Identifies a run: equal for two submissions that would write the same outputs."""
    text = json.dumps({"stage": stage, "config": resolved}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Upload


def _project_root() -> Path:
    if not (REPO_ROOT / "pyproject.toml").is_file() or not (REPO_ROOT / "uv.lock").is_file():
        raise ClusterError(
            f"dictlearn submit uploads the project checkout, but {REPO_ROOT} is not one (no "
            "pyproject.toml/uv.lock): run it from a checkout (`uv sync` installs it editable)"
        )
    return REPO_ROOT


def stage_upload(
    root: Path, config: Path, into: Path, secrets: dict[str, str] | None = None
) -> str:
    """Copy what the job needs (and ``secrets``, one file each) into ``into``.

    Returns:
        The config's path inside ``into``.
    """
    if secrets:
        (into / SECRETS_DIR).mkdir(mode=0o700)
        for name, value in secrets.items():
            fd = os.open(into / SECRETS_DIR / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value)
    for name in SHIPPED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns(*SHIP_IGNORE))
        else:
            shutil.copy2(source, into / name)
    config = config.resolve()
    inside = config.relative_to(root) if config.is_relative_to(root) else None
    if inside is not None and inside.parts[0] in SHIPPED and (into / inside).is_file():
        return inside.as_posix()
    target = into / SUBMITTED_DIR / config.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(config, target)
    return target.relative_to(into).as_posix()


def _job_id(stage: str, config: Path) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", config.stem.lower()).strip("-")[:40] or "config"
    return f"{stage}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Prepared:
    """A config checked for the cluster: what the job's command line will say."""

    stage: str
    overrides: list[str]
    """The user's overrides, plus ``ray.address=auto`` where the stage would start its own Ray."""
    resolved: dict[str, Any]
    digest: str
    """Equal for two submissions that would write the same outputs (:func:`config_digest`)."""


def prepare(config: str, overrides: list[str], stage: str | None = None) -> Prepared:
    """Infer the stage, validate as the stage would, and refuse what cannot work on a cluster.

    Raises:
        FileNotFoundError: no such config file.
        ConfigError: the config is invalid, its stage unclear, or it names relative paths.
    """
    overrides = list(overrides)
    path = Path(config)
    if not path.is_file():
        raise MissingInputError(f"config file {config} does not exist")
    stage = stage or infer_stage(apply_overrides(read_yaml(path), overrides), config)
    resolved = load_stage_config(stage, config, overrides)
    if stage in _RAY_ADDRESS_FIELD:
        field = _RAY_ADDRESS_FIELD[stage]
        present, value = _get_dotted(resolved, field)
        if present and value is None:
            # The job's driver runs on the cluster: join it instead of starting a private one.
            overrides.append(f"{field}=auto")
            resolved = load_stage_config(stage, config, overrides)
    relative = relative_paths(without_fields(resolved, _FILLED_IN.get(stage, ())))
    if relative:
        shown = ", ".join(f"{f}={_get_dotted(resolved, f)[1]!r}" for f in relative)
        raise ConfigError(
            f"{config}: {shown} {'is' if len(relative) == 1 else 'are'} relative; a job runs in a temporary copy of the upload, so "
            "relative paths read nothing and its outputs would vanish. Use gs:// URLs (or "
            f"absolute paths every node shares), e.g. {relative[0]}=gs://BUCKET/..."
        )
    return Prepared(stage, overrides, resolved, config_digest(stage, resolved))


def submit(
    config: str,
    overrides: list[str] | None = None,
    *,
    address: str | None = None,
    stage: str | None = None,
    stop_grace_s: int = DEFAULT_STOP_GRACE_S,
) -> Submission:
    """Check ``config`` + ``overrides`` here (:func:`prepare`), then submit
    ``dictlearn STAGE CONFIG overrides`` as a Ray job.

    Raises:
        FileNotFoundError, ConfigError: see :func:`prepare`.
        ClusterError: the cluster is unreachable, refuses the token, or already runs this config.
    """
    prepared = prepare(config, list(overrides or []), stage)
    stage, overrides, digest = prepared.stage, prepared.overrides, prepared.digest
    path = Path(config)
    root = _project_root()
    client, address = connect(address)
    with cluster_errors(address):
        for job in client.list_jobs():
            if (job.metadata or {}).get("dictlearn_digest") == digest and job.status in ACTIVE:
                raise ClusterError(
                    f"job {job.submission_id} on {address} is already {job.status} with this "
                    f"config: `dictlearn jobs stop {job.submission_id} --address {address}` "
                    "first, or let it finish (a new job resumes from its checkpoints)"
                )
        _warn_on_version_mismatch(client)
        forwarded = {name: os.environ[name] for name in FORWARDED_SECRETS if os.environ.get(name)}
        with tempfile.TemporaryDirectory(prefix="dictlearn-submit-") as tmp:
            remote_config = stage_upload(root, path, Path(tmp), forwarded)
            command = shlex.join(["dictlearn", stage, remote_config, *overrides])
            # `NAME="$(cat FILE)" dictlearn ...`: the value reaches the process, never a log.
            reads = [f'{name}="$(cat {SECRETS_DIR}/{name})"' for name in forwarded]
            entrypoint = " ".join([*reads, command])
            job_id = client.submit_job(
                entrypoint=entrypoint,
                submission_id=_job_id(stage, path),
                runtime_env={
                    "working_dir": tmp,
                    "excludes": [f"**/{p}" for p in SHIP_IGNORE],
                    "env_vars": {
                        # Read by Ray's job supervisor: the grace between SIGTERM and SIGKILL.
                        "RAY_JOB_STOP_WAIT_TIME_S": str(stop_grace_s),
                        # Job logs are files: one progress-bar line per 30 s, not per step.
                        "TQDM_MININTERVAL": "30",
                    },
                },
                metadata={
                    "dictlearn_stage": stage,
                    "dictlearn_config": config,
                    "dictlearn_digest": digest,
                },
            )
    return Submission(job_id, address, stage, entrypoint, config, tuple(forwarded))


def _warn_on_version_mismatch(client: JobSubmissionClient) -> None:
    import ray

    # The client records the cluster's version when it connects (no public accessor).
    cluster_ray = client._server_ray_version
    if cluster_ray and cluster_ray != ray.__version__:
        print(
            f"warning: the cluster runs Ray {cluster_ray}, this checkout locks Ray "
            f"{ray.__version__}: set the cluster up from this uv.lock (infra/README.md)",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------------------------
# CLI


def submit_arguments(p: argparse.ArgumentParser) -> None:
    """``dictlearn submit CONFIG.yaml [overrides] --address URL [--stage STAGE]``."""
    p.add_argument("config", metavar="CONFIG.yaml", help="Config of the stage to run.")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="Dotted overrides, passed on to the job's command line.",
    )
    address_argument(p)
    p.add_argument(
        "--stage",
        choices=STAGES,
        help="Stage to run (default: inferred from the config's top-level keys).",
    )
    p.add_argument(
        "--stop-grace",
        type=int,
        default=DEFAULT_STOP_GRACE_S,
        metavar="SECONDS",
        help="After `dictlearn jobs stop`, how long Ray waits for the job to checkpoint and exit "
        f"before SIGKILL (default {DEFAULT_STOP_GRACE_S}).",
    )


def address_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        metavar="URL",
        help="Ray dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: "
        "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS).",
    )


def follow_up_commands(job_id: str, address: str) -> list[str]:
    return [
        f"dictlearn jobs status {job_id} --address {address}",
        f"dictlearn jobs logs {job_id} --address {address} --follow",
        f"dictlearn jobs stop {job_id} --address {address}",
    ]


def run_submit(args: argparse.Namespace) -> Submission:
    """The ``submit`` command's handler: submit, then print the job id and what to run next."""
    result = submit(
        args.config,
        args.overrides,
        address=args.address,
        stage=args.stage,
        stop_grace_s=args.stop_grace,
    )
    secrets_line = (
        f"  env         {', '.join(result.forwarded_env)} forwarded from this shell"
        if result.forwarded_env
        else "  env         no WANDB_API_KEY here: W&B online logging needs one (metrics/ is "
        "written either way)"
    )
    print(
        "\n".join(
            [
                f"submitted {result.stage} job {result.job_id} to {result.address}",
                f"  command     {result.entrypoint}",
                secrets_line,
                "next:",
                *(f"  {line}" for line in follow_up_commands(result.job_id, result.address)),
            ]
        )
    )
    return result
