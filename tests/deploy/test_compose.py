"""The team setup's files (docker-compose.yml, Dockerfile, .env.example, deploy/), checked without a
Docker engine (these machines have none): the compose file is parsed with PyYAML and interpolated
with .env.example's values the way compose does; commands are checked against the real CLIs'
flags (ours through build_parser, mlflow's and optuna-dashboard's through --help); the server's
environment is fed to ServerSettings.from_env; the PostgreSQL init script runs against a real
PostgreSQL server. `docker compose config` runs only where a compose plugin exists.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

# tests/ is on sys.path (pytest's default rootdir-relative import of tests/conftest.py).
from postgres import INSTALL_HINT, Cluster, find_bin_dir

from moeplat.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "optuna-dashboard", "server", "worker", "worker-cpu"}
PUBLISHED = {"server": 8765, "mlflow": 5000, "optuna-dashboard": 8080, "minio": 9001, "postgres": 5432}
DATABASES = {"mlflow", "optuna", "moeplat"}
_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@cache
def env_example() -> dict[str, str]:
    out = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $) on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m[1], m[2], m[3]
        if env.get(name):
            return env[name]
        assert op != ":?", f"${{{name}}} is required: {arg}"
        return arg if op == ":-" else ""

    return _VAR.sub(one, value).replace("$$", "$")


@cache
def raw() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@cache
def compose() -> dict:
    return interpolate(raw(), env_example())


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def services() -> dict[str, dict]:
    return compose()["services"]


def long_running() -> list[str]:
    return [n for n, s in services().items() if s.get("restart") != "no"]


def test_services_and_published_ports():
    assert set(services()) == SERVICES
    for name, port in PUBLISHED.items():
        published = [p.rsplit(":", 2) for p in services()[name]["ports"]]
        assert [(addr, int(host), int(inner)) for addr, host, inner in published] == [
            ("127.0.0.1", port, port)
        ]
    for name in ("server", "mlflow", "optuna-dashboard"):  # each listens where it is published
        cmd = services()[name]["command"]
        assert cmd[cmd.index("--port") + 1] == str(PUBLISHED[name]) and "0.0.0.0" in cmd


def test_every_long_running_service_has_a_healthcheck_and_dependencies_wait_for_it():
    assert set(long_running()) == SERVICES - {"minio-init"}
    for name in long_running():
        test = services()[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    for name, svc in services().items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, how in deps.items():
            assert dep in services(), f"{name} depends on unknown {dep}"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services()[dep], f"{name} waits for {dep}, which has no healthcheck"
            else:
                assert how["condition"] == "service_completed_successfully"
                assert services()[dep].get("restart") == "no", f"{dep} is not a one-shot"
    assert services()["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services()["server"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_named_volumes_are_declared_and_used():
    declared = set(compose()["volumes"])
    used = set()
    for name, svc in services().items():
        for v in svc.get("volumes", []):
            source = v.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared
    assert "pgdata" in used and "minio-data" in used
    for name in ("server", "worker", "worker-cpu"):
        assert "./specs:/specs:ro" in services()[name]["volumes"]


def test_every_variable_is_in_env_example_and_every_example_is_used():
    used = {m[1] for text in _strings(raw()) for m in _VAR.finditer(text)}  # values, not comments
    example = env_example()
    assert used - set(example) == set(), "add these to .env.example"
    assert set(example) - used == set(), ".env.example lists variables the compose file does not use"
    for secret in ("MOEPLAT_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert example[secret].startswith("change-me"), f"{secret} must be a placeholder"
    assert len(example["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter ones
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def test_gpu_reservation_and_cpu_profile():
    gpu = services()["worker"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in gpu and gpu["build"]["target"] == "cuda"
    cpu = services()["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu" and "deploy" not in cpu
    assert all("profiles" not in s for n, s in services().items() if n != "worker-cpu")


@cache
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _flags(cmd: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in cmd if a.startswith("--")]


@pytest.mark.parametrize("name", ["server", "worker", "worker-cpu"])
def test_moeplat_commands_parse_with_our_cli(name):
    cmd = services()[name]["command"]
    assert cmd[0] == "moeplat"
    known = {o for a in _subcommands()[cmd[1]]._actions for o in a.option_strings}
    assert set(_flags(cmd)) <= known, f"{name}: unknown flags {set(_flags(cmd)) - known}"
    args = build_parser().parse_args(cmd[1:])  # exits (SystemExit) on anything it does not take
    assert args.command == cmd[1]


def test_server_environment_reaches_the_settings(monkeypatch):
    from moeplat.server.settings import ServerSettings

    env = services()["server"]["environment"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = ServerSettings.from_env()
    example = env_example()
    pg = f"postgresql+psycopg2://{example['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}@postgres:5432"
    assert s.token == example["MOEPLAT_TOKEN"] and s.db_url == f"{pg}/moeplat"
    assert s.tracking_uri == "http://mlflow:5000" and s.sweep_storage == f"{pg}/optuna"
    assert s.spec_roots == (Path("/specs"),) and s.work_dir == Path("/var/lib/moeplat/server")
    assert (
        s.mlflow_ui_url == example["MOEPLAT_MLFLOW_UI_URL"]
        and s.dashboard_url == example["MOEPLAT_DASHBOARD_URL"]
    )
    assert not s.loopback or services()["server"]["command"][3] == "0.0.0.0"


def test_worker_environment_reaches_the_worker_command(monkeypatch):
    for k, v in services()["worker"]["environment"].items():
        monkeypatch.setenv(k, v)
    args = build_parser().parse_args(services()["worker"]["command"][1:])
    assert args.server == "http://server:8765" and args.token == env_example()["MOEPLAT_TOKEN"]
    assert args.spec_root == "/specs"  # the server's spec root, mounted at the same place


def test_health_endpoint_answers_without_the_token(tmp_path):
    """The server's and workers' healthchecks call /api/health without a token."""
    from fastapi.testclient import TestClient

    from moeplat.server.app import create_app
    from moeplat.server.settings import ServerSettings

    s = ServerSettings(
        host="0.0.0.0", token="secret", db_url=f"sqlite:///{tmp_path / 'jobs.db'}", work_dir=tmp_path
    )
    with TestClient(create_app(s)) as client:
        assert client.get("/api/health").json()["ok"] is True
        assert client.get("/api/jobs").status_code == 401
    for name in ("server", "worker"):
        assert "/api/health" in " ".join(services()[name]["healthcheck"]["test"])


@cache
def _help(tool: str, *sub: str) -> str:
    out = subprocess.run([str(BIN / tool), *sub, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("name", "tool", "sub"), [("mlflow", "mlflow", ("server",)), ("optuna-dashboard", "optuna-dashboard", ())]
)
def test_tool_commands_use_flags_the_installed_tools_have(name, tool, sub):
    cmd = services()[name]["command"]
    assert cmd[: 1 + len(sub)] == [tool, *sub]
    text = _help(tool, *sub)
    for flag in _flags(cmd):
        assert re.search(rf"(^|[\s,/]){re.escape(flag)}\b", text, re.M), f"{tool} has no {flag}"


def test_mlflow_server_stores_in_postgres_and_proxies_artifacts_to_minio():
    mlflow = services()["mlflow"]
    cmd = mlflow["command"]
    backend = urlsplit(cmd[cmd.index("--backend-store-uri") + 1])
    assert backend.scheme == "postgresql+psycopg2" and backend.hostname == "postgres"
    assert backend.path.lstrip("/") in DATABASES
    dest = urlsplit(cmd[cmd.index("--artifacts-destination") + 1])
    assert (dest.scheme, dest.netloc) == ("s3", env_example()["MLFLOW_BUCKET"]) and "--serve-artifacts" in cmd
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    init = " ".join(services()["minio-init"]["command"])
    assert "mc mb --ignore-existing" in init and "$MLFLOW_BUCKET" in init
    assert services()["minio-init"]["environment"]["MLFLOW_BUCKET"] == dest.netloc


def test_mlflow_accepts_the_host_names_its_clients_use():
    """MLflow 3 rejects unknown Host headers; the containers call it by its service name."""
    from mlflow.server.security_utils import is_allowed_host_header

    cmd = services()["mlflow"]["command"]
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    tracking = services()["server"]["environment"]["MLFLOW_TRACKING_URI"]
    for host in (
        urlsplit(tracking).netloc,
        "localhost:5000",
        urlsplit(env_example()["MOEPLAT_MLFLOW_UI_URL"]).netloc,
    ):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example:5000")


def test_dashboard_reads_the_sweeps_storage():
    storage = services()["optuna-dashboard"]["command"][-1]
    assert storage == services()["server"]["environment"]["MOEPLAT_SWEEP_STORAGE"]
    assert urlsplit(storage).path.lstrip("/") in DATABASES


def _stages() -> dict[str, list[str]]:
    """Dockerfile stage name -> its instructions (continuation lines joined)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = m[1]
            stages[current] = [line]
        elif current and line and not line.startswith("#"):
            stages[current].append(line)
    return stages


def test_dockerfile_targets_and_the_pinned_torch():
    stages = _stages()
    assert {"web", "cpu", "cuda", "tools"} <= set(stages)
    for svc in services().values():
        if "build" in svc:
            assert svc["build"]["target"] in stages
    pin = next(
        ln for ln in (REPO / "requirements/cpu.txt").read_text().splitlines() if ln.startswith("torch==")
    )
    for target in ("cpu", "cuda"):
        steps = stages[target]
        torch = next(i for i, s in enumerate(steps) if "pip install" in s and pin in s.split())
        if target == "cpu":
            assert "--index-url https://download.pytorch.org/whl/cpu" in steps[torch]
        package = next(i for i, s in enumerate(steps) if re.match(r"RUN scripts/install-locked\.sh\b", s))
        assert torch < package, f"{target}: torch must be installed before the lock's torch>=2.4 is met"
        copied = {s.split()[1] for s in steps[:package] if s.startswith("COPY")}
        assert {"requirements/lock.txt", "scripts/install-locked.sh"} <= copied, target
        assert any(s.startswith("COPY --from=web") and "web/dist" in s for s in steps)
        assert any(s.startswith("USER ") and "root" not in s for s in steps)


def test_web_stage_builds_the_client_with_the_specs_it_embeds():
    steps = _stages()["web"]
    assert any("npm ci" in s for s in steps) and any("npm run build" in s for s in steps)
    assert "specs" in (REPO / "web/build.mjs").read_text()  # build.mjs reads ../specs
    workdir = next(s.split()[1] for s in steps if s.startswith("WORKDIR"))
    copied = [s.split() for s in steps if s.startswith("COPY") and "specs/" in s]
    assert copied and Path(copied[0][-1]) == Path(workdir).parent / "specs"


def test_tools_image_installs_from_the_lock():
    """mlflow server and optuna-dashboard at the clients' versions: the tools image installs them with
    the lock as a hash-checked constraints file (tests/deploy/test_lock.py checks the lock itself)."""
    from test_lock import locked

    steps = _stages()["tools"]
    assert any(s.startswith("COPY requirements/lock.txt /tmp/lock.txt") for s in steps)
    (install,) = [s for s in steps if "pip install -c" in s]
    words = install.split()
    assert "pip==26.3" in words  # hash-checked constraints need a recent pip
    names = words[words.index("/tmp/lock.txt") + 1 : words.index("&&", words.index("/tmp/lock.txt"))]
    assert set(names) == {"mlflow", "optuna", "optuna-dashboard", "psycopg2-binary", "boto3"}
    assert set(names) <= set(locked()), "every package of the tools image is in the lock"


def test_build_context_keeps_what_the_dockerfile_copies():
    ignored = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    text = (REPO / "Dockerfile").read_text()
    sources = [src for m in re.finditer(r"^COPY\s+(?!--from)(.+)$", text, re.M) for src in m[1].split()[:-1]]
    assert {"pyproject.toml", "README.md", "moeplat/", "specs/", "web/", "requirements/lock.txt"} <= set(
        sources
    )
    for src in sources:
        assert (REPO / src).exists(), src
        kept = f"!{src}" in ignored  # an exception re-includes one file of an ignored folder
        assert kept or (src.rstrip("/") not in ignored and src.split("/")[0] not in ignored), (
            f"{src} is in .dockerignore"
        )


def test_postgres_init_script_creates_the_three_databases():
    """Run deploy/postgres/*.sql with psql as the postgres image's entrypoint does, on a real server."""
    import psycopg2

    mount = next(v for v in services()["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v)
    scripts = sorted((REPO / mount.split(":")[0]).glob("*.sql"))
    assert scripts
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries not found: {INSTALL_HINT}")
    cluster = Cluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        for script in scripts:
            psql = [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "--no-psqlrc",
                "-h",
                "127.0.0.1",
                "-p",
                str(cluster.port),
            ]
            out = subprocess.run(
                [str(bin_dir / psql[0]), *psql[1:], "-U", "postgres", "-d", "postgres", "-f", str(script)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
        conn = psycopg2.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname="moeplat")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            names = {r[0] for r in cur.fetchall()}
        conn.close()
    finally:
        cluster.stop()
    assert names >= DATABASES
    urls = [*services()["server"]["environment"].values(), *services()["mlflow"]["command"]]
    used = {urlsplit(u).path.lstrip("/") for u in urls if u.startswith("postgresql")}
    assert used == DATABASES  # every database a service uses is one the script creates


def _compose_cli() -> tuple[list[str], bool] | None:
    """(`docker compose` or the older `docker-compose`, whether it knows the top-level `name`)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"], True
    if legacy := shutil.which("docker-compose"):  # v1 (Debian's 1.29): the Compose spec minus `name`
        return [legacy], False
    return None


def test_compose_itself_accepts_the_file_and_interpolates_like_this_test(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` here: the file is checked statically only")
    cmd, knows_name = cli
    text = (REPO / "docker-compose.yml").read_text()
    if not knows_name:
        assert text.count("\nname: moeplat\n") == 1
        text = text.replace("\nname: moeplat\n", "\n")
    (tmp_path / "docker-compose.yml").write_text(text)
    for d in ("deploy", "specs"):
        (tmp_path / d).symlink_to(REPO / d)
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text())
    out = subprocess.run(
        [*cmd, "--profile", "cpu", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    theirs = yaml.safe_load(out.stdout)["services"]
    assert set(theirs) == SERVICES
    for name in ("server", "worker", "worker-cpu", "mlflow"):
        assert theirs[name]["environment"] == services()[name]["environment"], name
    for name in ("server", "worker", "mlflow", "optuna-dashboard"):
        assert theirs[name]["command"] == services()[name]["command"], name


def _image_env(target: str) -> str:
    """The ENV instructions a target sees: its own and those of the stages it is built FROM."""
    stages = _stages()
    out = []
    while target in stages:
        steps = stages[target]
        out += [s for s in steps if s.startswith("ENV ")]
        target = steps[0].split()[1]
    return " ".join(out)


@pytest.mark.parametrize("target", ["cpu", "cuda", "tools"])
def test_images_send_no_usage_telemetry(target):
    """MLflow 3 sends usage telemetry by default; no image of ours does (README, "Telemetry")."""
    assert "MLFLOW_DISABLE_TELEMETRY=true" in _image_env(target).split()


def test_services_send_no_usage_telemetry_unless_env_opts_in():
    """Every service running mlflow or moeplat turns MLflow's telemetry off; .env's
    MLFLOW_DISABLE_TELEMETRY=false (the documented opt-in) reaches all of them."""
    users = {"mlflow", "server", "worker", "worker-cpu"}
    for name in users:
        assert services()[name]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true", name
    opted_in = interpolate(raw(), {**env_example(), "MLFLOW_DISABLE_TELEMETRY": "false"})["services"]
    for name in users:
        assert opted_in[name]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "false", name
    without = {k: v for k, v in env_example().items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    unset = interpolate(raw(), without)["services"]  # an older .env without the line: still off
    for name in users:
        assert unset[name]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true", name


def test_workers_reach_the_datasets_bucket_in_minio():
    """Specs on the team setup name s3://<DATASETS_BUCKET>/... (prepared corpora, data_files):
    minio-init creates the bucket, workers get MinIO's endpoint and credentials the way s3fs reads
    them, and a cache on their volume for downloaded corpora (docs/data.md, "Object storage")."""
    init = services()["minio-init"]
    assert init["environment"]["DATASETS_BUCKET"] == env_example()["DATASETS_BUCKET"]
    assert 'mc mb --ignore-existing "local/$DATASETS_BUCKET"' in " ".join(init["command"])
    for name in ("worker", "worker-cpu"):
        env = services()[name]["environment"]
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == env_example()["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == env_example()["MINIO_ROOT_PASSWORD"]
        volume = next(v for v in services()[name]["volumes"] if v.endswith(":/var/lib/moeplat"))
        assert env["MOEPLAT_CACHE_DIR"].startswith("/var/lib/moeplat/"), volume
