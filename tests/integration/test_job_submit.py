"""A real two-node Ray cluster on this machine with token authentication, and the tiny pipeline
submitted to it with the `ray job submit` CLI exactly as a user types it.

The cluster: `ray start --head` (no CPUs: it holds the GCS, the dashboard with the Jobs API and
the job's driver, as the Ray docs advise for the heads of large clusters) and
`ray start --address ...` (2 CPUs: the actors and the training worker), each `--block` in its own
session, with free ports, its own short `--temp-dir`, `RAY_AUTH_MODE=token` and a token file
under tmp_path (RAY_AUTH_TOKEN_PATH), so ~/.ray/auth_token is never read or written. The
dashboard listens on 127.0.0.1 only; Ray itself turns 127.0.0.1 into the machine's own address
as the node IP, and its GCS listens on every interface (hence token authentication).

Isolation from the other tests' `ray.init()` in the same pytest session: a plain `ray.init()`
joins an existing cluster only through RAY_ADDRESS or the "current cluster" file of the default
temp dir (/tmp/ray/ray_current_cluster); `ray start --temp-dir X` writes X/ray_current_cluster
instead, and every Ray setting here goes to the subprocesses' environment only, never to
os.environ. The nodes are stopped by signalling the processes this test started (never
`ray stop`, which would kill every Ray instance on the machine); whatever is left of their
sessions gets SIGKILL, and the test checks that no process of this cluster remains.

The teacher is the scripted OpenAI-compatible server of conftest.py on loopback HTTP; the
student is the tiny random Llama; warm-up is off and the fine-tuning takes two steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the cluster's processes"),
]

_BESIDE = Path(sys.executable).with_name("ray")  # the `ray` CLI of the Python running the tests
RAY = str(_BESIDE) if _BESIDE.exists() else shutil.which("ray")
PAIRS = 16
# Variables that would point a Ray client or node at some other cluster or token.
_FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_HEADERS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(extra)
    return env


def _proc_info(pid: int) -> tuple[int, str] | None:
    """(session id, state) of a live process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[3]), fields[0]


def _cluster_pids(sessions: set[int], marker: str) -> list[int]:
    """Live (non-zombie) processes of these sessions or whose command line mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        info = _proc_info(pid)
        if info is None or info[1] == "Z":
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if info[0] in sessions or marker in cmdline:
            found.append(pid)
    return found


def _http(url: str, token: str | None = None, bearer: str = "Bearer ") -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": bearer + token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def _state(dashboard: str, token: str, what: str) -> list[dict]:
    status, body = _http(f"{dashboard}/api/v0/{what}?limit=10000&detail=1", token)
    assert status == 200, (status, body[:500])
    return json.loads(body)["data"]["result"]["result"]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class TwoNodeCluster:
    """Head + one worker node started with `ray start --block`, each in its own session.

    `start()` starts them; `stop()` (always call it, also when `start()` failed) ends them.
    """

    ATTEMPTS = 2  # a node that dies while starting (Ray gives a raylet 30 s to register) is started again
    START_TIMEOUT_S = 180

    def __init__(self, tmp_path: Path):
        self.root = Path(tempfile.mkdtemp(prefix="cdr-", dir="/tmp"))  # unix socket paths stay short
        self.token = os.urandom(32).hex()
        self.token_file = tmp_path / "ray_auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file),
                              RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
                              RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s drain on SIGTERM
        self.procs: list[subprocess.Popen] = []
        self.running: list[tuple[subprocess.Popen, Path]] = []
        self.gcs_port = 0
        self.dashboard = ""

    def start(self) -> None:
        def head_args() -> list[str]:
            ports = _free_ports(9)
            self.gcs_port, self.dashboard = ports[0], f"http://127.0.0.1:{ports[1]}"
            return ["--head", "--port", str(ports[0]), "--include-dashboard", "true",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports[1]),
                    "--ray-client-server-port", str(ports[2]), "--num-cpus", "0", *self._node_ports(ports[3:])]

        def worker_args() -> list[str]:
            return ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "2", *self._node_ports(_free_ports(6))]

        self._start("head", head_args, lambda: _http(f"{self.dashboard}/api/jobs/", self.token)[0] == 200,
                    "the head's Jobs API")
        self._start("worker", worker_args, lambda: len(self.alive_nodes()) == 2, "the worker node to join")

    @staticmethod
    def _node_ports(p: list[int]) -> list[str]:
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5])]

    def _start(self, name: str, make_args, ready, what: str) -> None:
        for attempt in range(1, self.ATTEMPTS + 1):
            log = self.root / f"{name}-{attempt}.log"
            cmd = [RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", str(self.root / name),
                   "--object-store-memory", str(200 * 1024**2), *make_args()]
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)  # stop() ends every session started here, the failed ones too
            deadline = time.time() + self.START_TIMEOUT_S
            while not ready():
                for node, node_log in self.running:
                    assert node.poll() is None, f"{node_log.stem} exited:\n{_tail(node_log)}"
                if proc.poll() is not None:
                    assert attempt < self.ATTEMPTS, f"the {name} node exited ({proc.returncode}):\n{_tail(log)}"
                    break
                assert time.time() < deadline, f"timed out waiting for {what}:\n{_tail(log)}"
                time.sleep(1.0)
            else:
                self.running.append((proc, log))
                return

    def alive_nodes(self) -> list[dict]:
        status, body = _http(f"{self.dashboard}/api/v0/nodes?limit=100&detail=1", self.token)
        if status != 200:
            return []
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def stop(self) -> list[int]:
        """SIGTERM each `ray start` (worker first), SIGKILL what is left; the pids that survived."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops its node's processes
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        sessions = {p.pid for p in self.procs}  # each `ray start` leads its own session
        deadline = time.time() + 15
        while _cluster_pids(sessions, str(self.root)) and time.time() < deadline:
            time.sleep(0.5)
        for pid in _cluster_pids(sessions, str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        deadline = time.time() + 15
        while (left := _cluster_pids(sessions, str(self.root))) and time.time() < deadline:
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
        return left


@pytest.fixture
def ray_cluster(tmp_path):
    from ray._common.utils import get_ray_address_file

    default_file = Path(get_ray_address_file(None))  # what a plain ray.init() would read
    cluster = TwoNodeCluster(tmp_path)
    try:
        cluster.start()
        # Our cluster announced itself in its own temp dir only: other tests' ray.init() cannot
        # find it, and this process's environment names no cluster.
        assert (cluster.root / "head" / "ray_current_cluster").read_text().endswith(f":{cluster.gcs_port}")
        assert not (default_file.exists() and default_file.read_text().strip().endswith(f":{cluster.gcs_port}"))
        assert "RAY_ADDRESS" not in os.environ or str(cluster.gcs_port) not in os.environ["RAY_ADDRESS"]
        yield cluster
    finally:
        left = cluster.stop()
    assert not left, f"processes of the test cluster still running: {left}"


def _ray_cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_on_two_node_cluster_with_token_auth(ray_cluster, scripted_teacher, tmp_path):
    cluster = ray_cluster
    dash, token = cluster.dashboard, cluster.token
    nodes = cluster.alive_nodes()
    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])

    # The Jobs API: no token 401, a wrong one 403, the right one 200.
    assert _http(f"{dash}/api/jobs/")[0] == 401
    assert _http(f"{dash}/api/jobs/", "not-the-token")[0] == 403
    assert _http(f"{dash}/api/jobs/", token)[0] == 200

    teacher, url = scripted_teacher()
    run_dir = tmp_path / "run"
    submission_id = f"compeffdist-test-{os.getpid()}-{int(time.time())}"
    submit = ["job", "submit", "--address", dash, "--submission-id", submission_id,
              "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
              "python", "jobs/run_pipeline.py", "--config", "configs/tiny-test.yaml", "--run-dir", str(run_dir),
              "ray.address=auto", "ray.progress_bars=false",
              "teacher.backend=openai", "teacher.model=scripted", f"teacher.openai.base_url={url}",
              "teacher.openai.backoff_s=0.01", "teacher.openai.max_concurrency=4",
              "attributes.num_texts=6", "tasks.max_perspectives=2", "tasks.tasks_per_perspective=1",
              "tasks.num_demonstrations=2", f"pairing.num_texts={PAIRS}", "warmup.enabled=false"]

    # `ray job submit` without the token is refused before anything is uploaded.
    refused = _ray_cli(submit, _clean_env(), timeout=120)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr
    assert _http(f"{dash}/api/jobs/{submission_id}", token)[0] == 404
    assert not run_dir.exists()

    # With RAY_AUTH_MODE=token and the token file it goes through; the CLI tails the job's logs
    # until it ends.
    t0 = time.time()
    done = _ray_cli(submit, _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_file)), 900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert f"Job '{submission_id}' succeeded" in out, out[-3000:]
    assert "finetune      done" in out  # the driver's status table reached the submitter
    print(f"job ran in {time.time() - t0:.0f} s")

    # `ray job status` with the token in --headers (RAY_AUTH_MODE unset), `ray job logs` with
    # RAY_AUTH_MODE=token and the token itself in RAY_AUTH_TOKEN.
    status = _ray_cli(["job", "status", "--address", dash, submission_id,
                       "--headers", json.dumps({"Authorization": f"Bearer {token}"})], _clean_env(), 120)
    assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status.stdout
    logs = _ray_cli(["job", "logs", "--address", dash, submission_id],
                    _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), 120)
    assert logs.returncode == 0 and "finetune: done, 8 rows" in logs.stdout + logs.stderr

    # The upload left out what runtime_env.yaml excludes; the driver ran on the head and joined
    # this cluster (ray.address=auto): the job's actors ran on the worker node.
    code, body = _http(f"{dash}/api/jobs/{submission_id}", token)
    assert code == 200, body[:500]
    job = json.loads(body)
    assert job["status"] == "SUCCEEDED" and job["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    shipped = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert job["runtime_env"]["excludes"] == shipped["excludes"]
    assert job["runtime_env"]["env_vars"] == shipped["env_vars"]
    actors = _state(dash, token, "actors")
    supervisor = [a for a in actors if a.get("name") == f"_ray_internal_job_actor_{submission_id}"]
    assert supervisor and supervisor[0]["node_id"] == head_id
    mine = [a for a in actors if a["job_id"] == job["job_id"]]
    workers = [a for a in mine if a["class_name"] == "RayTrainWorker" or a["class_name"].startswith("MapWorker(")]
    assert {a["class_name"] for a in workers} >= {"RayTrainWorker", "MapWorker(MapBatches(TeacherUDF))"}, mine
    assert {a["node_id"] for a in workers} == {worker_id}

    # The run's artifacts: every stage done, row counts as configured, the teacher's bill matches.
    from compeffdist_ray.stages import STAGES

    stages = [s.name for s in STAGES if not s.proxy_mode_only]
    manifests = {s: json.loads((run_dir / s / "_manifest.json").read_text()) for s in stages}
    rows = {s: m["rows"] for s, m in manifests.items()}
    assert rows["attributes"] > 0 and rows["perspectives"] >= 1 and rows["tasks"] >= 1
    assert rows["pairing"] == rows["responses"] == rows["difficulty"] == PAIRS
    assert rows["sampling"] == rows["finetune"] == PAIRS // 2
    assert manifests["warmup"]["stats"]["enabled"] is False
    assert manifests["finetune"]["stats"]["steps"] == 2 and manifests["finetune"]["stats"]["workers"] == 1
    assert len(pd.read_parquet(run_dir / "sampling" / "kept.parquet")) == PAIRS // 2
    assert (run_dir / "finetune" / "model" / "model.safetensors").exists()
    assert set(teacher.kinds) >= {"attributes", "task", "demonstration"}
    spent = [sum(m["tokens"].get(k, 0) for m in manifests.values()) for k in ("input", "output")]
    assert spent == [teacher.tokens["input"], teacher.tokens["output"]]
