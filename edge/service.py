"""`drywallqa edge install-service`: render systemd/drywallqa-edge.service and install it (or print it)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from drywallqa.edge.settings import default_config_path
from drywallqa.paths import PROJECT_ROOT

UNIT_NAME = "drywallqa-edge.service"
ENV_FILE = Path("/etc/drywallqa/edge.env")  # the unit's EnvironmentFile=
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


def systemd_quote(arg: str) -> str:
    """One word of a unit's command line: `%` and `$` doubled (systemd would expand them as specifiers and
    environment variables), and a word with blanks, quotes or backslashes put in double quotes."""
    if not arg or any(ch in arg for ch in "\n\r\0"):
        raise ServiceInstallError(f"{arg!r} cannot be written on a unit's command line")
    text = arg.replace("%", "%%").replace("$", "$$")
    if arg != ";" and not any(ch in arg for ch in " \t\"'\\"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def default_argv() -> list[str]:
    """The drywallqa of the environment running this command. Never sys.executable resolved: a virtualenv's
    python is a link to the base interpreter, which does not see the virtualenv's packages."""
    python = Path(os.path.abspath(sys.executable))
    script = python.parent / "drywallqa"
    if script.is_file():
        return [str(script), "edge", "run"]
    return [str(python), "-m", "drywallqa.edge", "run"]


def default_exec() -> str:
    return unit_command(default_argv())


def exec_argv(exec_path: str | None) -> list[str]:
    """The unit's command, word by word. A bare program gets what runs the edge added: `--exec
    /opt/dq/bin/drywallqa` means `/opt/dq/bin/drywallqa edge run` (a unit running the bare program would only
    print its usage and fail). A program whose path has blanks is one word when it exists (or is quoted)."""
    if not exec_path:
        return default_argv()
    words = [exec_path] if Path(exec_path).is_file() else shlex.split(exec_path)
    if len(words) > 1:
        return words
    name = Path(words[0]).name
    if name == "drywallqa":
        return [words[0], "edge", "run"]
    if name.startswith("python"):
        return [words[0], "-m", "drywallqa.edge", "run"]
    return words


def unit_command(argv: list[str]) -> str:
    """A command, word by word, as it goes on the unit's ExecStart= line (systemd quoting)."""
    return " ".join(systemd_quote(a) for a in argv)


PROTECTED_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))


def hidden_by_protect_home(exec_cmd: str) -> bool:
    """The unit sets ProtectHome=yes, so a command under /home or /root cannot start as the service."""
    program = Path(shlex.split(exec_cmd)[0])
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
    """`exec_cmd` is already a unit command line (`unit_command`); the config path is quoted here."""
    text = unit_template_path().read_text(encoding="utf-8")
    return text.replace("@EXEC@", exec_cmd).replace("@CONFIG@", systemd_quote(str(config))).replace("@USER@", user)


def _under(prefix: Path, path: Path) -> Path:
    return prefix / path.relative_to(path.anchor) if path.is_absolute() else prefix / path


def install_service(*, prefix: Path = Path("/"), config: Path = Path("/etc/drywallqa/edge.yaml"),
                    user: str = "drywallqa", exec_path: str | None = None, dry_run: bool = False,
                    enable: bool = True) -> int:
    if not config.is_absolute():
        print(f"error: --config {config}: give an absolute path (the service does not start in this directory)",
              file=sys.stderr)
        return 2
    try:
        argv = exec_argv(exec_path)
        exec_cmd = unit_command(argv)
        unit = render_unit(exec_cmd, config, user)
    except (ServiceInstallError, ValueError) as exc:  # ValueError: shlex, an unclosed quote in --exec
        print(f"error: --exec / --config: {exc}", file=sys.stderr)
        return 2
    if hidden_by_protect_home(exec_cmd):
        print(f"warning: {argv[0]} is under /home, /root or /run/user, which the unit hides "
              f"(ProtectHome=yes), so the service cannot start it. Install DrywallQA outside them (e.g. a "
              f"virtualenv in /opt/drywallqa) and run this again, or pass --exec.", file=sys.stderr)
    if prefix.resolve() == Path("/") and Path(argv[0]).is_absolute() and not Path(argv[0]).is_file():
        print(f"warning: {argv[0]} does not exist, so the service cannot start it (a path with blanks in --exec "
              f"needs quotes: --exec '\"/opt/my dir/bin/drywallqa\"')", file=sys.stderr)
    unit_path = _under(prefix, Path("/etc/systemd/system") / UNIT_NAME)
    config_path = _under(prefix, config)
    env_path = _under(prefix, ENV_FILE)
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
    # The config and the secrets first, then the unit that names them; existing ones are the site's: kept.
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config_path.write_text(service_config_text(), encoding="utf-8")
        config_path.chmod(0o644)
    env_path.parent.mkdir(parents=True, exist_ok=True)
    if not env_path.exists():
        env_path.write_text(ENV_TEMPLATE, encoding="utf-8")
        env_path.chmod(0o600)
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit, encoding="utf-8")
    unit_path.chmod(0o644)
    edge = shlex.join(argv[:-1]) if argv[-1] == "run" else "drywallqa edge"  # what the unit runs, less `run`
    print(f"installed {unit_path}\nconfig    {config_path}\nsecrets   {env_path}\n"
          f"check it: {edge} check-config --config {shlex.quote(str(config))} --env-file {ENV_FILE} --model-check")
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
