"""`drywallqa edge install-service`: render systemd/drywallqa-edge.service and install it (or print it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from drywallqa.edge.settings import default_config_path
from drywallqa.paths import PROJECT_ROOT

UNIT_NAME = "drywallqa-edge.service"
ENV_TEMPLATE = """# Environment for drywallqa-edge.service (secrets belong here, not in edge.yaml). Mode 0600.
# DRYWALLQA_MQTT__HOST=broker.example
# DRYWALLQA_MQTT__USERNAME=edge
# DRYWALLQA_MQTT__PASSWORD=change-me
# DRYWALLQA_SOURCE__URI=/dev/video0
"""


class ServiceInstallError(RuntimeError):
    pass


def unit_template_path() -> Path:
    for candidate in (PROJECT_ROOT / "systemd" / UNIT_NAME, Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME):
        if candidate.is_file():
            return candidate
    raise ServiceInstallError(f"unit template {UNIT_NAME} not found (expected under {PROJECT_ROOT / 'systemd'})")


def default_exec() -> str:
    """The drywallqa of the environment running this command. Never sys.executable resolved: a virtualenv's
    python is a link to the base interpreter, which does not see the virtualenv's packages."""
    python = Path(os.path.abspath(sys.executable))
    script = python.parent / "drywallqa"
    if script.is_file():
        return f"{script} edge run"
    return f"{python} -m drywallqa.edge run"


def exec_command(exec_path: str | None) -> str:
    """The unit's command. A bare program gets what runs the edge added: `--exec /opt/dq/bin/drywallqa` means
    `/opt/dq/bin/drywallqa edge run` (a unit running the bare program would only print its usage and fail)."""
    if not exec_path:
        return default_exec()
    if len(exec_path.split()) > 1:
        return exec_path
    name = Path(exec_path).name
    if name == "drywallqa":
        return f"{exec_path} edge run"
    if name.startswith("python"):
        return f"{exec_path} -m drywallqa.edge run"
    return exec_path


PROTECTED_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))


def hidden_by_protect_home(exec_cmd: str) -> bool:
    """The unit sets ProtectHome=yes, so a command under /home or /root cannot start as the service."""
    program = Path(exec_cmd.split()[0])
    return any(program == home or home in program.parents for home in PROTECTED_HOMES)


def service_config_text() -> str:
    """The packaged config with `embedded_broker: never`. A service on a device publishes to a real broker
    (mosquitto.service or the site's) and spools alerts while it is down; in `auto` it could take the port from a
    broker that starts after it and hand alerts to a private broker nobody reads."""
    text = default_config_path().read_text(encoding="utf-8")
    new = text.replace("embedded_broker: auto", "embedded_broker: never", 1)
    if new == text:
        raise ServiceInstallError(f"{default_config_path()} has no 'embedded_broker: auto' line to switch off")
    return new


def render_unit(exec_cmd: str, config: Path, user: str) -> str:
    text = unit_template_path().read_text(encoding="utf-8")
    return text.replace("@EXEC@", exec_cmd).replace("@CONFIG@", str(config)).replace("@USER@", user)


def _under(prefix: Path, path: Path) -> Path:
    return prefix / path.relative_to(path.anchor) if path.is_absolute() else prefix / path


def install_service(*, prefix: Path = Path("/"), config: Path = Path("/etc/drywallqa/edge.yaml"),
                    user: str = "drywallqa", exec_path: str | None = None, dry_run: bool = False,
                    enable: bool = True) -> int:
    exec_cmd = exec_command(exec_path)
    unit = render_unit(exec_cmd, config, user)
    if hidden_by_protect_home(exec_cmd):
        print(f"warning: {exec_cmd.split()[0]} is under /home, /root or /run/user, which the unit hides "
              f"(ProtectHome=yes), so the service cannot start it. Install DrywallQA outside them (e.g. a "
              f"virtualenv in /opt/drywallqa) and run this again, or pass --exec.", file=sys.stderr)
    unit_path = _under(prefix, Path("/etc/systemd/system") / UNIT_NAME)
    config_path = _under(prefix, config)
    env_path = _under(prefix, Path("/etc/drywallqa/edge.env"))
    real_root = prefix.resolve() == Path("/")
    if dry_run:
        print(f"# would write {unit_path}\n{unit}")
        if not config_path.exists():
            print(f"# would copy {default_config_path()} -> {config_path} (with mqtt.embedded_broker: never)")
        if not env_path.exists():
            print(f"# would write {env_path} (mode 0600)\n{ENV_TEMPLATE}")
        if real_root:
            print(f"# would create system user {user!r} (group video) if missing, then: systemctl daemon-reload && "
                  f"systemctl enable --now {UNIT_NAME}")
        return 0
    if real_root and os.geteuid() != 0:
        print("error: installing into / needs root (sudo), or use --prefix DIR / --dry-run", file=sys.stderr)
        return 2
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit, encoding="utf-8")
    unit_path.chmod(0o644)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config_path.write_text(service_config_text(), encoding="utf-8")
        config_path.chmod(0o644)
    if not env_path.exists():
        env_path.write_text(ENV_TEMPLATE, encoding="utf-8")
        env_path.chmod(0o600)
    print(f"installed {unit_path}\nconfig    {config_path}\nsecrets   {env_path}")
    if real_root:
        _ensure_user(user)
        if enable and shutil.which("systemctl"):
            subprocess.run(["systemctl", "daemon-reload"], check=False)
            subprocess.run(["systemctl", "enable", "--now", UNIT_NAME], check=False)
        print(f"status: systemctl status {UNIT_NAME}   logs: journalctl -u drywallqa-edge -f")
    return 0


def _ensure_user(user: str) -> None:
    import pwd

    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/var/lib/drywallqa-edge",
                    "--shell", "/usr/sbin/nologin", "--user-group", "--groups", "video", user], check=True)
