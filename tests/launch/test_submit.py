"""``dictlearn submit`` / ``dictlearn jobs`` against a real Ray head with token authentication.

The module starts one Ray head on 127.0.0.1 (dashboard + Jobs API, ``RAY_AUTH_MODE=token`` with
a token made for the test, own temp dir and ports) and stops it by the PIDs of its processes,
never with ``ray stop``. Every command runs as the user runs it: a ``dictlearn`` subprocess.
The jobs run the real trainer on a planted dataset; the cluster's ``python`` is this venv's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dictlearn.config import ConfigError
from dictlearn.tracking import has_metrics, read_metrics
from launch import submit as submit_module
from launch.cli import build_parser, main
from launch.submit import (
    SECRETS_DIR,
    SHIPPED,
    SUBMITTED_DIR,
    ClusterError,
    infer_stage,
    prepare,
    relative_paths,
    resolve_address,
    stage_upload,
    submit,
)
from tests.train.helpers import (
    REPO_ROOT,
    assert_no_traceback,
    committed_steps,
    make_planted,
    tiny_config_dict,
    write_config,
)

VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------
# Without a cluster: stage inference, path checks, the upload, the parser


def test_stage_is_inferred_from_top_level_keys() -> None:
    assert infer_stage({"sae": {}, "data": {}, "train": {"steps": 3}}, "t.yaml") == "train"
    assert infer_stage({"corpus": {}, "hooks": ["resid_post.6"]}, "g.yaml") == "generate"
    assert infer_stage({"generate": {"hooks": []}, "train": {"sae": {}}}, "p.yaml") == "pipeline"
    assert infer_stage({"train": {"sae": {}, "train": {"steps": 2}}}, "p.yaml") == "pipeline"
    with pytest.raises(ConfigError, match=r"x\.yaml.*generate and train.*--stage"):
        infer_stage({"sae": {}, "hooks": []}, "x.yaml")
    with pytest.raises(ConfigError, match=r"no stage's keys.*top-level keys: foo.*--stage"):
        infer_stage({"foo": 1}, "y.yaml")


def test_relative_paths_are_found_and_urls_are_not() -> None:
    config = {
        "data": {"path": "runs/acts", "eval_fraction": 0.1},
        "run": {"output_dir": "gs://bucket/runs", "name": "x"},
        "corpus": {"paths": ["builtin:python-docs", "docs/a.txt"]},
        "model": {"gguf": "/models/g.gguf", "safetensors": None},
        "output": {"path": "~/acts"},
    }
    assert relative_paths(config) == ["data.path", "corpus.paths"]


def test_submit_refuses_relative_paths_before_contacting_a_cluster(tmp_path: Path) -> None:
    config = write_config(tmp_path / "t.yaml", tiny_config_dict("runs", "data/planted"))
    with pytest.raises(ConfigError, match=r"data\.path='data/planted'.*run\.output_dir"):
        submit(str(config), address="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        submit(str(config), ["train.batch_size=0"], address="http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        submit(str(tmp_path / "nope.yaml"), address="http://127.0.0.1:9")


def test_generate_and_pipeline_jobs_join_the_cluster(tmp_path: Path) -> None:
    """A stage that would start a private Ray cluster is told to join the job's cluster."""
    pipeline = str(REPO_ROOT / "launch" / "configs" / "pipeline_default.yaml")
    with pytest.raises(ConfigError, match=r"output_dir='runs' is relative.*gs://"):
        prepare(pipeline, [])
    prepared = prepare(pipeline, ["output_dir=gs://b/runs"])
    assert prepared.stage == "pipeline"
    assert prepared.overrides == ["output_dir=gs://b/runs", "generate.ray.address=auto"]

    generate = {
        "hooks": ["resid_post.6"],
        "corpus": {"paths": ["builtin:python-docs"], "n_shards": 2},
        "output": {"path": "gs://b/acts"},
    }
    config = str(write_config(tmp_path / "g.yaml", generate))
    assert prepare(config, []).overrides == ["ray.address=auto"]
    assert prepare(config, ["ray.address=h:6379"]).overrides == ["ray.address=h:6379"]
    # --stage wins over the keys: the same file is no train config.
    with pytest.raises(ConfigError, match=r"hooks: unknown key"):
        prepare(config, [], stage="train")


def test_address_falls_back_like_ray_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match=r"--address http://HEAD:8265.*RAY_API_SERVER_ADDRESS"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert resolve_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265/")
    assert resolve_address(None) == "http://a:8265"
    assert resolve_address("http://c:8265") == "http://c:8265"


def test_upload_holds_the_project_config_and_secrets(tmp_path: Path) -> None:
    outside = write_config(tmp_path / "mine.yaml", {"sae": {}})
    staged = tmp_path / "up"
    staged.mkdir()
    remote = stage_upload(REPO_ROOT, outside, staged, {"WANDB_API_KEY": "k123"})
    assert remote == f"{SUBMITTED_DIR}/mine.yaml"
    assert (staged / remote).read_text() == outside.read_text()
    assert sorted(p.name for p in staged.iterdir()) == sorted(
        [*SHIPPED, SUBMITTED_DIR, SECRETS_DIR]
    )
    assert (staged / "launch" / "submit.py").read_text() == Path(submit_module.__file__).read_text()
    assert not list(staged.rglob("__pycache__")) and not list(staged.rglob("*.pyc"))
    secret = staged / SECRETS_DIR / "WANDB_API_KEY"
    assert secret.read_text() == "k123"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    inside = tmp_path / "up2"
    inside.mkdir()
    config = REPO_ROOT / "launch" / "configs" / "train_tiny.yaml"
    assert stage_upload(REPO_ROOT, config, inside) == "launch/configs/train_tiny.yaml"
    assert not (inside / SECRETS_DIR).exists() and not (inside / SUBMITTED_DIR).exists()


def test_upload_matches_the_container_image() -> None:
    """The job gets the same files the KubeRay image is built from."""
    dockerfile = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    copied = {
        name
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for name in line.split()[1:-1]
    }
    assert copied == set(SHIPPED)


def test_job_ids_name_stage_and_config() -> None:
    """Ids are file names on the head (job-driver-ID.log): no spaces or odd characters."""
    job = submit_module._job_id("train", Path("/x/My Config.v2.yaml"))
    assert re.fullmatch(r"train-my-config-v2-\d{8}-\d{6}-[0-9a-f]{4}", job), job


def test_parser_has_submit_and_jobs_actions() -> None:
    parser = build_parser()
    args = parser.parse_args(["submit", "c.yaml", "a.b=1", "--address", "http://h:8265"])
    assert (args.config, args.overrides, args.address, args.stage) == (
        "c.yaml",
        ["a.b=1"],
        "http://h:8265",
        None,
    )
    args = parser.parse_args(["jobs", "logs", "J", "--follow", "--address", "http://h:8265"])
    assert (args.action, args.job_id, args.follow) == ("logs", "J", True)
    assert parser.parse_args(["jobs", "list"]).address is None
    with pytest.raises(SystemExit):
        parser.parse_args(["jobs", "tail", "J"])


# ----------------------------------------------------------------------------------------------
# A real Ray head with token authentication


@dataclass
class Cluster:
    address: str
    token: str
    temp_dir: Path

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        """Environment of a client shell: the cluster's token (or ``token``), no tqdm."""
        env = _base_env()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token if token is None else token)
        env.update(extra)
        return env


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "WANDB_API"))
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        TQDM_DISABLE="1",
        JAX_PLATFORMS="cpu",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    env.pop("PYTHONPATH", None)  # the job must import the uploaded code, nothing else
    return env


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kill_tree(session_id: int) -> None:
    """SIGTERM, then SIGKILL, every process of the session ``ray start`` ran in, and their
    descendants (job drivers run in sessions of their own)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session_id:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    procs = {p.pid: p for p in members}
    for proc in members:
        try:
            procs |= {c.pid: c for c in proc.children(recursive=True)}
        except psutil.Error:
            continue
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="dlsubmit-", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, nm, om = _free_ports(9)
    env = _base_env()
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--temp-dir={temp_dir / 'ray'}",
        "--num-cpus=2",
        "--disable-usage-stats",
    ]
    # Its own session: every Ray daemon it leaves behind keeps this session id.
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=temp_dir,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output[-3000:]
        yield Cluster(f"http://127.0.0.1:{dashboard}", token, temp_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_tree(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def dictlearn(
    *args: str | os.PathLike[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert_no_traceback(result.stderr)
    return result.stdout


def _job_id(submit_stdout: str) -> str:
    match = re.search(r"^submitted train job (\S+) to ", submit_stdout, flags=re.MULTILINE)
    assert match, submit_stdout
    return match.group(1)


@pytest.fixture(scope="module")
def planted_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("planted") / "data")
    make_planted(url)
    return url


def test_submit_runs_a_train_job_and_jobs_show_it(
    cluster: Cluster, planted_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "tiny.yaml", tiny_config_dict(tmp_path, planted_url))
    run_dir = tmp_path / "runs" / "tiny"
    key = "wandb-test-" + secrets.token_hex(16)
    env = cluster.env(WANDB_API_KEY=key)
    address = ["--address", cluster.address]

    submitted = dictlearn("submit", config, *address, env=env)
    out = _ok(submitted)
    job = _job_id(out)
    assert f"dictlearn train {SUBMITTED_DIR}/tiny.yaml" in out
    assert f"dictlearn jobs logs {job} --address {cluster.address} --follow" in out
    assert "WANDB_API_KEY forwarded" in out

    followed = dictlearn("jobs", "logs", job, "--follow", *address, env=env)
    assert f"[job {job} SUCCEEDED]" in followed.stderr, followed.stdout[-3000:]
    assert "training done: 8 steps, 512 tokens" in _ok(followed)
    assert committed_steps(run_dir / "checkpoints") == [4, 8]

    status = _ok(dictlearn("jobs", "status", job, *address, env=env))
    assert re.search(r"^status\s+SUCCEEDED$", status, flags=re.MULTILINE), status
    assert re.search(rf"^config\s+{re.escape(str(config))}$", status, flags=re.MULTILINE)
    assert re.search(r"^exit code\s+0$", status, flags=re.MULTILINE)

    logs = _ok(dictlearn("jobs", "logs", job, *address, env=env))
    assert "training done: 8 steps" in logs and f"run dir      {run_dir}" in logs

    # The same config again: a new job that finds the run finished and trains nothing.
    checkpoints = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    rows = len(read_metrics(str(run_dir)))
    again = _job_id(_ok(dictlearn("submit", config, *address, env=env)))
    assert again != job
    followed = dictlearn("jobs", "logs", again, "--follow", *address, env=env)
    assert f"[job {again} SUCCEEDED]" in followed.stderr, followed.stdout[-3000:]
    assert "training done: 8 steps" in followed.stdout
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == checkpoints
    assert len(read_metrics(str(run_dir))) == rows

    # --address defaults to $RAY_API_SERVER_ADDRESS, as for `ray job`.
    table = _ok(dictlearn("jobs", "list", env=env | {"RAY_API_SERVER_ADDRESS": cluster.address}))
    table = table.splitlines()
    assert table[0].split() == ["ID", "STATUS", "STARTED", "TIME", "STAGE", "CONFIG"]
    for job_id in (job, again):
        (row,) = [line for line in table if line.startswith(job_id + " ")]
        assert row.split()[1] == "SUCCEEDED" and row.split()[-2:] == ["train", str(config)]

    everything = submitted.stdout + submitted.stderr + followed.stdout + status + logs
    assert key not in everything + "\n".join(table)


def test_stop_checkpoints_and_keeps_the_key_out_of_logs(
    cluster: Cluster, planted_url: str, tmp_path: Path
) -> None:
    data = tiny_config_dict(
        tmp_path,
        planted_url,
        train={"steps": 1_000_000, "log_every": 1},
        checkpoint={"every_steps": 1_000_000},
        run={"name": "long"},
    )
    config = write_config(tmp_path / "long.yaml", data)
    run_dir = tmp_path / "runs" / "long"
    key = "wandb-test-" + secrets.token_hex(16)
    env = cluster.env(WANDB_API_KEY=key)
    address = ["--address", cluster.address]
    submitted = dictlearn("submit", config, *address, env=env)
    job = _job_id(_ok(submitted))

    deadline = time.monotonic() + 150
    while not has_metrics(str(run_dir)) or not read_metrics(str(run_dir)):
        assert time.monotonic() < deadline, "the job logged no step in 150 s"
        time.sleep(0.5)

    # The trainer (the job's driver) got the key and runs the uploaded code, not this checkout.
    (driver,) = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "train" in (p.info["cmdline"] or [])
        and f"{SUBMITTED_DIR}/long.yaml" in p.info["cmdline"]
        and "python" in Path(p.info["cmdline"][0]).name
    ]
    driver_env = driver.environ()
    assert driver_env["WANDB_API_KEY"] == key
    upload = Path(driver_env["PYTHONPATH"].split(os.pathsep)[0])
    assert "working_dir_files" in upload.parts and upload != REPO_ROOT
    assert (upload / "launch" / "submit.py").is_file()

    # A second job of the same config while this one runs would share its checkpoints.
    twice = dictlearn("submit", config, *address, env=env)
    assert twice.returncode == 2, twice.stdout + twice.stderr
    assert f"job {job} on {cluster.address} is already RUNNING" in twice.stderr
    assert_no_traceback(twice.stderr)

    stopped = _ok(dictlearn("jobs", "stop", job, *address, env=env))
    assert stopped.strip().endswith(f"job {job} STOPPED"), stopped
    logs = _ok(dictlearn("jobs", "logs", job, *address, env=env))
    assert "training preempted: checkpoint written" in logs, logs[-3000:]
    steps = committed_steps(run_dir / "checkpoints")
    assert len(steps) == 1 and 0 < steps[0] < 1_000_000, steps
    assert f"training preempted: checkpoint written, re-run to resume: {steps[0]} steps" in logs

    # The key is in no output, no job log and no log Ray keeps on the head.
    assert key not in submitted.stdout + submitted.stderr + stopped + logs
    session_logs = cluster.temp_dir / "ray" / "session_latest" / "logs"
    leaked = [
        str(p) for p in session_logs.rglob("*") if p.is_file() and key.encode() in p.read_bytes()
    ]
    assert leaked == []


def test_bad_token_unknown_job_and_unreachable_cluster(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = ["--address", cluster.address]
    no_token = _base_env()
    refused = dictlearn("jobs", "list", *address, env=no_token)
    assert refused.returncode == 2
    assert_no_traceback(refused.stderr)
    (line,) = refused.stderr.strip().splitlines()
    assert cluster.address in line and "needs a token and none was sent" in line
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line

    wrong = dictlearn("jobs", "list", *address, env=cluster.env(token="0" * 64))
    assert wrong.returncode == 2 and "rejected the token sent" in wrong.stderr
    assert "RAY_AUTH_TOKEN" in wrong.stderr

    unknown = dictlearn("jobs", "status", "no-such-job", *address, env=cluster.env())
    assert unknown.returncode == 2
    assert f"no job 'no-such-job' on {cluster.address}" in unknown.stderr

    # No token is involved in these two: run them in this process (no interpreter start-up).
    (port,) = _free_ports(1)
    dead = f"http://127.0.0.1:{port}"
    assert main(["jobs", "list", "--address", dead]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"cannot reach the Ray Jobs API at {dead}" in line and "--address" in line
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["jobs", "status", "x"]) == 2
    assert "no cluster address: pass --address" in capsys.readouterr().err
