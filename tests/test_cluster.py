"""The cluster deliverables: launcher configs, the RayJob manifest, and the job script.

Why these tests look the way they do:

* Cluster YAMLs are checked with Ray's OWN schema (``ray-schema.json`` via
  ``validate_config``), before and after Ray's ``prepare_config`` (which is what ``ray up``
  validates), plus the security properties the configs promise (token auth on, no port open to
  the internet, no credentials). A cloud ``ray up`` cannot run here; everything else does.
* ``test_ray_job_submit_with_token_auth`` is the real `ray job submit` path: a `ray start`
  head with Ray token authentication ON, a working dir that holds ONLY ``explain_job.py``
  (proving the script needs nothing next to it), the real pipeline on real JPEGs, and checks
  of the job status, the Zarr store and that neither the token nor a canary credential leaks
  into the job log or the store.
* ``test_ray_up_submit_down_local_provider_over_ssh`` is the cluster-launcher path:
  `ray up` / `ray submit` / `ray down` with the local provider over SSH to the test's own
  sshd, the "head" isolated in a PID + mount namespace (details at that test).
* Ray's AWS bootstrap runs on ``aws.yaml`` against moto's EC2/IAM emulation (the one place
  with an emulator: AWS cannot be reached from here) to show the security group holds.

Every Ray head these tests start uses its own ports and temp dir and is stopped by killing
the processes it started (never `ray stop`, which would kill every Ray instance on the
machine, including other test modules' clusters).
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = ("aws.yaml", "gcp.yaml", "local.yaml")
#: The `ray` CLI of the Python running the tests (not whichever `ray` is first on PATH).
_BIN_RAY = Path(sys.executable).with_name("ray")
RAY = str(_BIN_RAY) if _BIN_RAY.exists() else (shutil.which("ray") or "ray")

# Cheap but real pipeline settings: the packaged pretrained EfficientNet-Lite0 at 64 px, an
# early layer, Group-CAM with 8 groups, one CPU actor. 6 images in units of 4 -> 2 units.
NUM_IMAGES = 6
UNIT_SIZE = 4
JOB_ARGS = [
    "--model", "efficientnet-lite0",
    "--layer", "_blocks.4",
    "--image-size", "64",
    "--preset", "fast",
    "--groups", "8",
    "--batch-size", "4",
    "--cpu",
    "--actors", "1",
    "--cpus-per-actor", "1",
    "--no-progress",
]  # fmt: skip


# --------------------------------------------------------------------------------------
# helpers
def load_explain_job() -> Any:
    """``cluster/explain_job.py`` as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("explain_job", CLUSTER / "explain_job.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_ports(n: int) -> list[int]:
    """``n`` distinct currently free TCP ports on 127.0.0.1 (all held open until chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address/auth settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS")) and k != "RAY_ADDRESS"
    }
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def write_token(path: Path) -> str:
    """A fresh Ray auth token, written with owner-only permissions (as a user would keep it)."""
    token = secrets.token_hex(32)
    path.write_text(token)
    path.chmod(0o600)
    return token


def build_tiny_manifest(root: Path, images: Path) -> tuple[Path, int]:
    """A Parquet manifest of ``NUM_IMAGES`` real JPEGs from ``images`` (copied into
    ``root``); returns (path, num_units)."""
    from pipeline.data.build import build_from_folder

    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    for src in sorted(images.glob("*.JPEG"))[:NUM_IMAGES]:
        shutil.copy(src, img_dir / src.name)
    out = root / "manifest.parquet"
    m = build_from_folder(img_dir, out, layout="flat", unit_size=UNIT_SIZE)
    assert m.num_rows == NUM_IMAGES
    return out, m.num_units


def assert_store_complete(store: Path, num_units: int) -> None:
    """Every unit has its completion marker and every row a written (non-PENDING) status."""
    import numpy as np
    import zarr

    from pipeline.data.decode import Status
    from pipeline.store.units import done_units

    assert done_units(str(store)) == set(range(num_units))
    status = np.asarray(zarr.open_group(str(store), mode="r")["status"][:])
    assert status.shape == (NUM_IMAGES,)
    assert not (status == int(Status.PENDING)).any(), status
    assert (status == int(Status.OK)).all(), status


def tree_text(root: Path) -> str:
    """All small text files under ``root`` (Zarr metadata, attributes, markers) concatenated."""
    parts = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size < 1_000_000:
            try:
                parts.append(p.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue
    return "\n".join(parts)


def proc_cmdlines() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every process, read from /proc (no psutil dependency)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            yield int(entry), raw.replace(b"\0", b" ").decode("utf-8", "replace")


def kill_tree_by_marker(marker: str) -> None:
    """SIGKILL leftover processes whose command line contains ``marker`` (a unique temp dir
    of ours), e.g. Ray workers orphaned by a crashed head. Never matches by process name."""
    for pid, cmd in proc_cmdlines():
        if pid != os.getpid() and marker in cmd:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the test process dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed pytest never leaves a Ray head or sshd behind."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def http_get(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status code, body) of a GET, with ``Authorization: Bearer`` when ``token`` is given."""
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------------------
# cluster-launcher YAMLs
def _load(name: str) -> dict[str, Any]:
    with open(CLUSTER / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _start_commands(cfg: dict[str, Any]) -> list[str]:
    cmds = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_validates_against_ray_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(name)
    validate_config(cfg)  # raw file
    prepared = prepare_config(cfg)  # what `ray up` validates (provider defaults filled in)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_schema_validation_catches_mistakes() -> None:
    """The schema check above can fail: a misspelt key or a wrong type is rejected."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = _load("aws.yaml")
    bad = dict(cfg, setup_comands=["echo typo"])
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = dict(cfg, max_workers="eight")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_security(name: str) -> None:
    """Token auth on, token distributed, dashboard not public, no secrets in the file."""
    cfg = _load(name)
    text = yaml.safe_dump(cfg)  # the data only: comments may explain what is avoided
    starts = _start_commands(cfg)
    assert len(starts) == 2, starts  # one head, one worker start command
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        assert "0.0.0.0" not in cmd, f"{name}: `ray start` must not bind to all interfaces: {cmd}"
    assert "--head" in starts[0] and "--autoscaling-config=~/ray_bootstrap_config.yaml" in starts[0]
    assert "--address=$RAY_HEAD_IP:6379" in starts[1]
    assert "RAY_AUTH_MODE=disabled" not in text
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert cfg["file_mounts"].get("~/unioncam") == "."
    assert "0.0.0.0/0" not in text, f"{name} opens something to the whole internet"
    # The project is installed and importable on every node before Ray starts.
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "unioncam" in setup
    assert "import pipeline.cli" in setup
    assert re.search(r"AKIA[0-9A-Z]{16}", text) is None
    for word in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "private_key_id", "BEGIN "):
        assert word not in text, f"{name} contains {word!r}"


COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_commands_are_valid_bash(name: str, tmp_path: Path) -> None:
    """Every command parses as bash (YAML quoting mistakes, such as a `` #`` that silently
    cuts a plain scalar, show up here), and the virtualenv activation line, run twice on an
    Ubuntu-style ~/.bashrc, puts exactly one `source` line first."""
    cfg = _load(name)
    for key in COMMAND_KEYS:
        for cmd in cfg.get(key) or []:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{name} {key}: {cmd!r}: {r.stderr}"
    (activate,) = [c for c in cfg["setup_commands"] if ".bashrc" in c]
    home = tmp_path / "home"
    home.mkdir()
    original = ["case $- in", "    *i*) ;;", "      *) return;;", "esac", "export FOO=1"]
    (home / ".bashrc").write_text("\n".join(original) + "\n")
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for _ in range(2):  # `ray up` reruns setup commands on every update: must be idempotent
        subprocess.run(["bash", "-c", activate], env=env, check=True, timeout=30)
    lines = (home / ".bashrc").read_text().splitlines()
    assert lines == ["source ~/venv/bin/activate", *original]


def test_aws_yaml_uses_own_security_group_and_instance_profiles() -> None:
    """Ray's auto-created security group opens SSH to 0.0.0.0/0; giving SecurityGroupIds on
    every node type makes Ray use ours. S3 access comes from instance profiles (IMDSv2)."""
    cfg = _load("aws.yaml")
    types = cfg["available_node_types"]
    for name, nt in types.items():
        nc = nt["node_config"]
        assert nc.get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
        assert nc.get("SubnetIds"), f"{name}: no SubnetIds"
        assert "instance-profile/" in nc["IamInstanceProfile"]["Arn"], name
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name
    gpu = [nt for nt in types.values() if nt.get("resources", {}).get("GPU")]
    assert gpu and gpu[0]["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    assert "boto3" in " ".join(cfg["head_setup_commands"])


def _aws_bootstrap(cfg: dict[str, Any], ec2: Any, iam: Any, with_sg: bool) -> dict[str, Any]:
    """Ray's own AWS bootstrap (what `ray up` runs before launching anything) on ``cfg`` with
    the REPLACE_... placeholders filled by resources created in the EC2/IAM emulation."""
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-west-2a")
    subnet_id = subnet["Subnet"]["SubnetId"]
    ec2.modify_subnet_attribute(SubnetId=subnet_id, MapPublicIpOnLaunch={"Value": True})
    sg = ec2.create_security_group(GroupName="unioncam-ray", Description="unioncam", VpcId=vpc)
    sg_id = sg["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=sg_id,
        IpPermissions=[
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg_id}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
             "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
        ],
    )  # fmt: skip
    ec2.create_key_pair(KeyName="unioncam")
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    account = None
    for prof in ("unioncam-ray-head", "unioncam-ray-worker"):
        arn = iam.create_instance_profile(InstanceProfileName=prof)["InstanceProfile"]["Arn"]
        account = arn.split(":")[4]
    c = json.loads(json.dumps(cfg))
    c["auth"]["ssh_private_key"] = "/nonexistent/unioncam.pem"  # no key pair creation
    for nt in c["available_node_types"].values():
        nc = nt["node_config"]
        nc.update(ImageId=ami, SubnetIds=[subnet_id], KeyName="unioncam")
        nc["IamInstanceProfile"]["Arn"] = nc["IamInstanceProfile"]["Arn"].replace(
            "REPLACE_ACCOUNT_ID", account
        )
        if with_sg:
            nc["SecurityGroupIds"] = [sg_id]
        else:
            del nc["SecurityGroupIds"]
    return bootstrap_aws(prepare_config(c))


def _world_open_ports(ec2: Any) -> list[tuple[str, Any]]:
    return [
        (g["GroupName"], perm.get("FromPort"))
        for g in ec2.describe_security_groups()["SecurityGroups"]
        for perm in g["IpPermissions"]
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", []))
    ]


def test_aws_yaml_ray_bootstrap_keeps_our_security_group(monkeypatch) -> None:
    """Ray's real AWS bootstrap code, run against moto's EC2/IAM emulation (AWS itself cannot
    be reached here): with our SecurityGroupIds Ray creates no group of its own and nothing is
    open to 0.0.0.0/0; without them (control) Ray's default group opens SSH to the world."""
    moto = pytest.importorskip("moto")
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    cfg = _load("aws.yaml")
    with moto.mock_aws():
        ec2 = boto3.client("ec2", region_name="us-west-2")
        iam = boto3.client("iam", region_name="us-west-2")
        out = _aws_bootstrap(cfg, ec2, iam, with_sg=True)
        ours = {
            g["GroupName"]: g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]
        }
        for name, nt in out["available_node_types"].items():
            assert nt["node_config"]["SecurityGroupIds"] == [ours["unioncam-ray"]], name
            assert nt["node_config"]["IamInstanceProfile"]["Arn"].endswith(
                "unioncam-ray-head" if name == "head" else "unioncam-ray-worker"
            )
        assert not [n for n in ours if n.startswith("ray-autoscaler")]
        assert _world_open_ports(ec2) == []
    with moto.mock_aws():  # control: the reason the config names its own group
        ec2 = boto3.client("ec2", region_name="us-west-2")
        iam = boto3.client("iam", region_name="us-west-2")
        _aws_bootstrap(cfg, ec2, iam, with_sg=False)
        assert ("ray-autoscaler-unioncam", 22) in _world_open_ports(ec2)


def test_gcp_yaml_uses_custom_network_and_gpu_workers() -> None:
    cfg = _load("gcp.yaml")
    for name, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        nics = nc["networkInterfaces"]
        assert "/subnetworks/" in nics[0]["subnetwork"] and "default" not in nics[0]["subnetwork"]
        assert "unioncam-ray" in nc["tags"]["items"], name
    worker = cfg["available_node_types"]["gpu_worker"]
    acc = worker["node_config"]["guestAccelerators"][0]
    assert acc["acceleratorCount"] == 1 and acc["acceleratorType"].startswith("nvidia-")
    assert worker["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert worker["resources"]["GPU"] == 1
    assert worker["node_config"]["serviceAccounts"][0]["email"].startswith("unioncam-worker@")


def test_local_yaml_is_a_manual_onprem_cluster() -> None:
    from ray.autoscaler._private.util import prepare_config

    cfg = _load("local.yaml")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert cfg["auth"]["ssh_user"] and cfg["auth"]["ssh_private_key"]
    prepared = prepare_config(cfg)
    node = prepared["available_node_types"][prepared["head_node_type"]]
    assert node["max_workers"] == len(cfg["provider"]["worker_ips"])


# --------------------------------------------------------------------------------------
# KubeRay RayJob
def _rayjob_docs() -> list[dict[str, Any]]:
    with open(CLUSTER / "rayjob.yaml", encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def _env_entries(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for c in containers for e in c.get("env", [])]


def test_rayjob_manifest_structure() -> None:
    docs = _rayjob_docs()
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name")
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"]["mode"] == "token"  # Ray token auth stays on
    head = rc["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard not exposed
    assert "dashboard-host" not in head["rayStartParams"]
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers[0]["image"]
    workers = rc["workerGroupSpecs"]
    assert workers
    pods = [head["template"]["spec"]] + [w["template"]["spec"] for w in workers]
    gpu_groups = 0
    for w in workers:
        assert w["groupName"] and w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
        for c in w["template"]["spec"]["containers"]:
            limits = c["resources"]["limits"]
            if limits.get("nvidia.com/gpu") == 1:
                gpu_groups += 1
                assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu_groups >= 1
    # Credentials: IRSA service account and/or a Secret reference; never a literal value.
    sa_names = {p.get("serviceAccountName") for p in pods}
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert {a["metadata"]["name"] for a in accounts} >= sa_names - {None}
    for a in accounts:
        assert a["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam:")
    containers = [c for p in pods for c in p["containers"]]
    for e in _env_entries(containers):
        if re.search(r"SECRET|KEY|TOKEN|PASSWORD|CREDENTIAL", e["name"], re.I):
            assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e
    for c in containers:
        for ef in c.get("envFrom", []):
            assert set(ef) == {"secretRef"}, ef
    text = yaml.safe_dump_all(docs)  # the data only, without the explanatory comments
    assert re.search(r"AKIA[0-9A-Z]{16}", text) is None
    assert "aws_secret_access_key" not in text.lower()


def test_rayjob_entrypoint_parses_with_the_real_cli() -> None:
    """The entrypoint is `python .../explain_job.py ARGS`; ARGS must be valid `unioncam run`
    arguments, or the job would fail only once the cluster is up."""
    import shlex

    from pipeline.cli import build_parser

    (job,) = [d for d in _rayjob_docs() if d["kind"] == "RayJob"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "python" and words[1].endswith("/cluster/explain_job.py")
    ej = load_explain_job()
    assert ej.credential_options(words[2:]) == []
    ns = build_parser().parse_args(ej.build_run_argv(words[2:]))
    assert ns.command == "run" and ns.address == "auto"
    assert ns.manifest.startswith("s3://") and ns.store.startswith("s3://")


def test_dockerfile_copies_existing_paths() -> None:
    """`docker build -f cluster/Dockerfile .` needs every COPY source to exist in the repo."""
    text = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM rayproject/ray:2\.\d+\.\d+-py311-gpu$", text, re.M)
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY"):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    for s in sources:
        assert (REPO / s).exists(), f"Dockerfile copies missing {s}"


# --------------------------------------------------------------------------------------
# explain_job.py without a cluster
def test_explain_job_adds_address_auto_and_keeps_explicit_one() -> None:
    ej = load_explain_job()
    assert ej.build_run_argv(["m.parquet", "s.zarr", "--cpu"]) == [
        "run", "m.parquet", "s.zarr", "--cpu", "--address", "auto",
    ]  # fmt: skip
    assert ej.build_run_argv(["run", "m", "s", "--address=ray://h:10001"]) == [
        "run", "m", "s", "--address=ray://h:10001",
    ]  # fmt: skip


def test_explain_job_refuses_credentials_without_echoing_them(capsys) -> None:
    ej = load_explain_job()
    secret = "wJalrXUtnFEMI-canary-" + secrets.token_hex(4)
    rc = ej.main(
        [
            "s3://b/m.parquet",
            "s3://b/s.zarr",
            "--storage-option",
            "endpoint_url=http://127.0.0.1:9000",
            "--storage-option",
            f"secret={secret}",
            f"--storage-option=client_kwargs={json.dumps({'aws_access_key_id': secret})}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "secret" in err and "client_kwargs.aws_access_key_id" in err
    assert secret not in err
    assert len(err.strip().splitlines()) == 1
    # Non-secret options pass the check: the same call without the secrets reaches the CLI
    # (and fails there, on the missing manifest, with the CLI's one-line error).
    assert (
        ej.credential_options(["--storage-option", "token=anon", "--storage-option=anon=true"])
        == []
    )


def test_explain_job_bad_manifest_is_one_line_error(tmp_path: Path) -> None:
    """The lone script, run with `python` from an empty folder: the CLI's one-line error."""
    work = tmp_path / "job"
    work.mkdir()
    shutil.copy(CLUSTER / "explain_job.py", work / "explain_job.py")
    missing = tmp_path / "nope.parquet"
    r = subprocess.run(
        [sys.executable, "explain_job.py", str(missing), str(tmp_path / "s.zarr"), "--cpu"],
        cwd=work,
        env=clean_env(RAY_AUTH_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("unioncam run: error:"), r.stderr
    assert "nope.parquet" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


# --------------------------------------------------------------------------------------
# `ray job submit` against a real `ray start` head with token authentication
@contextmanager
def ray_head(tmp: Path, env: dict[str, str], num_cpus: int = 2) -> Iterator[dict[str, Any]]:
    """A `ray start --head --block` process on 127.0.0.1 with its own ports and temp dir.

    Stopped by SIGTERM to the process we started (then SIGKILL of anything left that names
    our temp dir): `ray stop` would also kill unrelated Ray instances on this machine.
    """
    gcs, dash, client, agent = free_ports(4)
    # Ray's socket paths must stay short (AF_UNIX limit): a temp dir directly under /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ucray-", dir="/tmp"))
    log = open(tmp / "head.log", "w")
    cmd = [
        RAY, "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={ray_tmp}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        yield {"proc": proc, "dashboard": f"http://127.0.0.1:{dash}", "log": tmp / "head.log"}
    finally:
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        finally:
            kill_tree_by_marker(str(ray_tmp))
            log.close()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for_dashboard(head: dict[str, Any], token: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head["proc"].poll() is not None:
            pytest.fail("ray start exited early:\n" + head["log"].read_text()[-3000:])
        try:
            code, _ = http_get(head["dashboard"] + "/api/jobs/", token, timeout=5)
            if code == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail("the Ray dashboard did not come up:\n" + head["log"].read_text()[-3000:])


@pytest.mark.slow
def test_ray_job_submit_with_token_auth(tmp_path: Path, sample_dir: Path) -> None:
    manifest, num_units = build_tiny_manifest(tmp_path / "data", sample_dir)
    store = tmp_path / "out" / "store.zarr"
    token_file = tmp_path / "auth_token"
    token = write_token(token_file)
    canary = "unioncam-canary-" + secrets.token_hex(8)
    # The head's environment plays the node's: token auth on, and (fake) credentials of the
    # kind an instance role or AWS_* variables provide, which must never be logged or stored.
    head_env = clean_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        AWS_ACCESS_KEY_ID="AKIA" + canary,
        AWS_SECRET_ACCESS_KEY=canary,
    )
    client_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    # The job's working dir holds ONLY the script: everything else must come from the
    # installed project (as on a real cluster).
    jobdir = tmp_path / "jobdir"
    jobdir.mkdir()
    shutil.copy(CLUSTER / "explain_job.py", jobdir / "explain_job.py")
    sid = "unioncam-test-" + secrets.token_hex(4)

    with ray_head(tmp_path, head_env) as head:
        wait_for_dashboard(head, token)
        url = head["dashboard"]
        # Token auth is really on: no token -> 401, wrong token -> 403.
        assert http_get(url + "/api/jobs/")[0] == 401
        assert http_get(url + "/api/jobs/", "0" * 64)[0] == 403
        r = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--working-dir", str(jobdir),
             "--submission-id", sid, "--",
             "python", "explain_job.py", str(manifest), str(store), *JOB_ARGS],
            env=client_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        code, body = http_get(f"{url}/api/jobs/{sid}", token)
        assert code == 200 and json.loads(body)["status"] == "SUCCEEDED", body
        code, body = http_get(f"{url}/api/jobs/{sid}/logs", token)
        assert code == 200
        logs = json.loads(body)["logs"]
        assert f"{NUM_IMAGES}" in logs  # the run's summary reached the job log
        # A client without the token cannot even read the job list.
        r_noauth = subprocess.run(
            [RAY, "job", "list", "--address", url],
            env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "none")),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r_noauth.returncode != 0
        assert sid not in r_noauth.stdout

    assert_store_complete(store, num_units)
    stored = tree_text(store)
    for secret in (token, canary):
        assert secret not in logs and secret not in out and secret not in stored


# --------------------------------------------------------------------------------------
# `ray up` / `ray submit` / `ray down`: the cluster launcher's local provider over SSH
#
# What runs: the test starts its own sshd (own host key and config, key-only login for the
# current user) on a free port of 127.0.0.1 and writes a cluster YAML derived from
# cluster/local.yaml (same token file mount, same token-auth `ray start` line, same setup
# import check; only the hosts, SSH details, ports and the install step differ). Then the real
# CLI: `ray up -y` (SSH, file mounts incl. the token, setup commands, `ray start` on the
# "head"), `ray submit` of cluster/explain_job.py (uploaded alone to ~ and run with the head's
# `python`; the pipeline explains real JPEGs into a Zarr store), and `ray down -y`.
#
# Two things make that possible and safe on a shared machine:
# * Ray's `auth` has no SSH port field; the YAML reaches the non-22 port through
#   `ssh_proxy_command` (the small TCP relay below; `nc %h PORT` in real life), the
#   documented mechanism for bastions and odd ports.
# * `ray down` (and the usual `ray stop` before `ray start`) stop EVERY Ray process of the
#   user on the head. So the "head node" is the sshd inside its own PID + mount namespace
#   (unshare): `ray stop` there sees only that namespace's processes, /tmp/ray (where
#   address="auto" finds the cluster) is private to it, and the home directory is an overlay
#   whose writes (~/ray_bootstrap_config.yaml, the bootstrap key, the uploaded script,
#   ~/.ray/auth_token) land in the test's temp dir. Killing the namespace's first process
#   kills everything in it, so cleanup is certain even when the test fails.

RELAY = r'''
"""ssh ProxyCommand: connect stdin/stdout to HOST:PORT (what `nc HOST PORT` does)."""
import os, socket, sys, threading
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def pump_in():
    while True:
        data = os.read(0, 65536)
        if not data:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        sock.sendall(data)
threading.Thread(target=pump_in, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
'''

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/ssh_host_ed25519_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
LogLevel INFO
"""

# Runs as the namespace's first process: private home overlay, private /tmp/ray, then sshd.
HEAD_SCRIPT = """\
set -eu
mount -t overlay overlay -o lowerdir={home},upperdir={tmp}/home-upper,workdir={tmp}/home-work {home}
if [ -d {home}/.ray ]; then mount -t tmpfs tmpfs {home}/.ray; fi
mkdir -p /tmp/ray /run/sshd
mount --bind {tmp}/ray-tmp /tmp/ray
exec {sshd} -D -e -f {tmp}/sshd_config
"""

NAMESPACE = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
             "--propagation", "private"]  # fmt: skip


def _sshd_path() -> str | None:
    return shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None
    )


def launcher_unavailable() -> str | None:
    """Why the cluster-launcher test cannot run on this machine, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (sshd in a PID/mount namespace)"
    if os.geteuid() != 0:
        return "needs root: it runs its own sshd and PID/mount namespaces"
    missing = [t for t in ("ssh", "ssh-keygen", "rsync", "unshare") if shutil.which(t) is None]
    if _sshd_path() is None:
        missing.append("sshd")
    if missing:
        return f"missing {', '.join(missing)} (apt-get install openssh-server rsync)"
    probe = subprocess.run([*NAMESPACE, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create PID/mount namespaces here: {probe.stderr.strip()[:200]}"
    return None


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the test sshd exited:\n" + log.read_text()[-3000:])
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail("the test sshd did not listen:\n" + log.read_text()[-3000:])


@contextmanager
def isolated_ssh_head(tmp: Path) -> Iterator[dict[str, Any]]:
    """An sshd on 127.0.0.1:<free port> inside its own PID + mount namespace."""
    pw = pwd.getpwuid(os.getuid())
    for d in ("home-upper", "home-work", "ray-tmp"):
        (tmp / d).mkdir()
    key = tmp / "id_ed25519"
    for path in (key, tmp / "ssh_host_ed25519_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "unioncam-test", "-f", str(path)],
            check=True, timeout=30,
        )  # fmt: skip
    shutil.copy(f"{key}.pub", tmp / "authorized_keys")
    (port,) = free_ports(1)
    (tmp / "sshd_config").write_text(SSHD_CONFIG.format(port=port, tmp=tmp, user=pw.pw_name))
    sshd = _sshd_path()
    # sshd refuses to start without its privilege-separation dir (the service unit creates it).
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    check = subprocess.run(
        [sshd, "-t", "-f", str(tmp / "sshd_config")], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr
    (tmp / "head.sh").write_text(HEAD_SCRIPT.format(home=pw.pw_dir, tmp=tmp, sshd=sshd))
    (tmp / "relay.py").write_text(RELAY)
    log_path = tmp / "sshd.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [*NAMESPACE, "bash", str(tmp / "head.sh")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        _wait_port(port, proc, log_path)
        yield {
            "proc": proc,
            "port": port,
            "user": pw.pw_name,
            "key": key,
            "proxy": f"{sys.executable} {tmp / 'relay.py'} %h {port}",
            "log": log_path,
        }
    finally:
        # unshare --fork ignores SIGTERM while it waits, so SIGKILL it; --kill-child then
        # SIGKILLs its child, the namespace's first process, and the kernel kills every other
        # process of the namespace (sshd sessions, Ray, workers) with it.
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def namespace_ray_processes(proc: subprocess.Popen) -> list[str]:
    """Command lines of Ray processes still running inside the head's PID namespace."""
    try:
        (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ns = os.readlink(f"/proc/{child}/ns/pid")
    except (OSError, ValueError):
        return []  # the namespace is gone
    found = []
    for pid, cmd in proc_cmdlines():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != ns:
                continue
        except OSError:
            continue
        if "raylet" in cmd or "gcs_server" in cmd or "dashboard" in cmd:
            found.append(cmd[:120])
    return found


def launcher_yaml(tmp: Path, head: dict[str, Any], token_file: Path, name: str) -> tuple[Path, str]:
    """cluster/local.yaml with only what is specific to this machine replaced; returns the
    YAML's path and the head's dashboard URL."""
    base = _load("local.yaml")
    (start,) = [c for c in base["head_start_ray_commands"] if "ray start" in c]
    assert "--port=6379" in start and "--object-manager-port=8076" in start
    gcs, om, dash, client, agent = free_ports(5)
    start = start.replace("--port=6379", f"--port={gcs}")
    start = start.replace("--object-manager-port=8076", f"--object-manager-port={om}")
    start += (
        f" --node-ip-address=127.0.0.1 --dashboard-port={dash} --ray-client-server-port={client}"
        f" --dashboard-agent-listen-port={agent} --num-cpus=2 --num-gpus=0"
    )
    cfg = dict(base)
    cfg["cluster_name"] = name
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {
        "ssh_user": head["user"],
        "ssh_private_key": str(head["key"]),
        "ssh_proxy_command": head["proxy"],
    }
    # The token travels exactly as in local.yaml (to ~/.ray/auth_token); the project itself
    # is already installed on this "machine image", so no "~/unioncam": "." mount and no pip.
    assert base["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    cfg["file_mounts"] = {"~/.ray/auth_token": str(token_file)}
    cfg["setup_commands"] = [
        c for c in base["setup_commands"] if "auth_token" in c or "import pipeline.cli" in c
    ]
    assert len(cfg["setup_commands"]) == 2, cfg["setup_commands"]
    cfg["head_start_ray_commands"] = [
        c for c in base["head_start_ray_commands"] if "ray start" not in c
    ] + [start]
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, f"http://127.0.0.1:{dash}"


def _ray_cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _tail(r: subprocess.CompletedProcess, n: int = 5000) -> str:
    return (r.stdout + "\n" + r.stderr)[-n:]


@pytest.mark.slow
def test_ray_up_submit_down_local_provider_over_ssh(sample_dir: Path) -> None:
    reason = launcher_unavailable()
    if reason:
        pytest.skip(f"cluster launcher test: {reason}")
    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH
    from ray.autoscaler._private.local.config import get_lock_path, get_state_path

    tmp = Path(tempfile.mkdtemp(prefix="uclaunch-", dir="/tmp"))
    name = "unioncam-test-" + secrets.token_hex(4)
    try:
        manifest, num_units = build_tiny_manifest(tmp / "data", sample_dir)
        store = tmp / "out" / "store.zarr"
        token_file = tmp / "client_auth_token"
        token = write_token(token_file)
        (tmp / "head").mkdir()
        with isolated_ssh_head(tmp / "head") as head:
            config, dashboard = launcher_yaml(tmp, head, token_file, name)
            up_done = down_done = False
            try:
                r = _ray_cli(["up", "-y", "--no-config-cache", "--disable-usage-stats",
                              "--log-style=record", str(config)], tmp, 300)  # fmt: skip
                up_done = True
                assert r.returncode == 0, _tail(r) + head["log"].read_text()[-2000:]
                # The head runs with token auth: the job API refuses a client without it.
                assert http_get(dashboard + "/api/jobs/")[0] == 401
                assert http_get(dashboard + "/api/jobs/", token)[0] == 200

                r = _ray_cli(["submit", "--no-config-cache", "--log-style=record", str(config),
                              str(CLUSTER / "explain_job.py"), "--",
                              str(manifest), str(store), *JOB_ARGS], tmp, 300)  # fmt: skip
                assert r.returncode == 0, _tail(r)
                assert token not in r.stdout + r.stderr
                assert_store_complete(store, num_units)

                # A failing job fails `ray submit` too, with the CLI's one-line error.
                r = _ray_cli(["submit", "--no-config-cache", "--log-style=record", str(config),
                              str(CLUSTER / "explain_job.py"), "--",
                              str(tmp / "missing.parquet"), str(tmp / "out" / "s2.zarr"),
                              "--cpu"], tmp, 180)  # fmt: skip
                assert r.returncode != 0, _tail(r)
                assert "unioncam run: error:" in r.stdout + r.stderr, _tail(r)

                r = _ray_cli(["down", "-y", "--log-style=record", str(config)], tmp, 180)
                down_done = True
                assert r.returncode == 0, _tail(r)
                deadline = time.monotonic() + 30
                while namespace_ray_processes(head["proc"]) and time.monotonic() < deadline:
                    time.sleep(0.5)
                assert namespace_ray_processes(head["proc"]) == []
            finally:
                if up_done and not down_done:
                    _ray_cli(["down", "-y", str(config)], tmp, 120)
    finally:
        # The launcher's client-side files: local-provider state/lock and cached configs.
        for p in (get_state_path(name), get_lock_path(name)):
            Path(p).unlink(missing_ok=True)
        for p in Path(tempfile.gettempdir()).glob("ray-config-*"):
            try:
                if name in p.read_text(encoding="utf-8", errors="replace"):
                    p.unlink()
            except OSError:
                pass
        user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:HASH_MAX_LENGTH]
        cluster_hash = hashlib.sha256(name.encode()).hexdigest()[:HASH_MAX_LENGTH]
        shutil.rmtree(f"/tmp/ray_ssh_{user_hash}/{cluster_hash}", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
