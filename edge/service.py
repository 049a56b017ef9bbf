"""`drywallqa edge install-service`: render systemd/drywallqa-edge.service and install it (or print it)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from drywallqa.edge.settings import INSTANCE_NAME, default_config_path
from drywallqa.paths import PROJECT_ROOT

UNIT_NAME = "drywallqa-edge.service"
ENV_FILE = Path("/etc/drywallqa/edge.env")  # the unit's EnvironmentFile=
ENV_TEMPLATE = """# Environment for drywallqa-edge.service and each camera's drywallqa-edge-NAME.service (secrets belong here,
# not in edge.yaml). Mode 0600.
# DRYWALLQA_MQTT__HOST=broker.example
# DRYWALLQA_MQTT__USERNAME=edge
# DRYWALLQA_MQTT__PASSWORD=change-me
# DRYWALLQA_SOURCE__URI=/dev/video0
"""


INSTANCE_ENV_TEMPLATE = """# Environment for {unit} only (read after /etc/drywallqa/edge.env: a line here wins). Mode 0600.
# DRYWALLQA_SOURCE__URI=rtsp://camera-2/stream
"""


class ServiceInstallError(RuntimeError):
    pass


def check_instance(instance: str | None) -> None:
    if instance is not None and not INSTANCE_NAME.fullmatch(instance):
        raise ServiceInstallError(f"--instance {instance!r}: use 1-32 lower-case letters, digits, '-' or '_', "
                                  f"starting with a letter or digit (e.g. front, rear, cam-2)")


def unit_name(instance: str | None = None) -> str:
    """drywallqa-edge.service, or drywallqa-edge-<instance>.service for a further camera of the device."""
    return UNIT_NAME if instance is None else f"drywallqa-edge-{instance}.service"


def env_files(instance: str | None = None) -> list[Path]:
    """The unit's EnvironmentFile= paths, in the order systemd reads them (a later file's line wins)."""
    return [ENV_FILE] if instance is None else [ENV_FILE, ENV_FILE.with_name(f"edge-{instance}.env")]


def default_config(instance: str | None = None) -> Path:
    return Path("/etc/drywallqa/edge.yaml" if instance is None else f"/etc/drywallqa/edge-{instance}.yaml")


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


def _replace_once(text: str, old: str, new: str, origin: Path) -> str:
    if old not in text:
        raise ServiceInstallError(f"{origin} has no {old.strip()!r} line to change")
    return text.replace(old, new, 1)


def service_config_text(instance: str | None = None) -> str:
    """The packaged config with `embedded_broker: never`. A service on a device publishes to a real broker
    (mosquitto.service or the site's) and spools alerts while it is down; in `auto` it could take the port from a
    broker that starts after it and hand alerts to a private broker nobody reads. A further camera's config
    names its `instance`, whose device id is then `<host name>-<instance>`: two runtimes with one id would share
    an MQTT client id and knock each other off the broker."""
    origin = default_config_path()
    text = _replace_once(origin.read_text(encoding="utf-8"), "embedded_broker: auto", "embedded_broker: never",
                         origin)
    if instance is not None:
        text = (f"# One camera of several on this device: drywallqa-edge-{instance}.service. Its mqtt.device_id is "
                f"<host name>-{instance}\n# unless set below.\ninstance: {instance}\n\n{text}")
    return text


def render_unit(exec_cmd: str, config: Path, user: str, instance: str | None = None) -> str:
    """`exec_cmd` is already a unit command line (`unit_command`); the config path is quoted here. A further
    camera's unit (`instance`) is the same unit under its own name, with its own state folder (so its own alert
    spool) and an environment file of its own read after the shared one."""
    origin = unit_template_path()
    text = origin.read_text(encoding="utf-8")
    if instance is not None:
        check_instance(instance)
        text = text.replace("drywallqa-edge", f"drywallqa-edge-{instance}")  # unit, state folder, journal name
        text = _replace_once(text, "Description=DrywallQA edge runtime ",
                             f"Description=DrywallQA edge runtime, camera {instance} ", origin)
        shared = f"EnvironmentFile=-{ENV_FILE}\n"
        text = _replace_once(text, shared, shared + f"EnvironmentFile=-{env_files(instance)[-1]}\n", origin)
    return text.replace("@EXEC@", exec_cmd).replace("@CONFIG@", systemd_quote(str(config))).replace("@USER@", user)


def _under(prefix: Path, path: Path) -> Path:
    return prefix / path.relative_to(path.anchor) if path.is_absolute() else prefix / path


def install_service(*, prefix: Path = Path("/"), config: Path | None = None, user: str = "drywallqa",
                    exec_path: str | None = None, dry_run: bool = False, enable: bool = True,
                    instance: str | None = None) -> int:
    """Install drywallqa-edge.service, or with `instance` the unit of a further camera of the device,
    drywallqa-edge-<instance>.service (its own config, device id, state folder and spool)."""
    try:
        check_instance(instance)
    except ServiceInstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = default_config(instance) if config is None else config
    if not config.is_absolute():
        print(f"error: --config {config}: give an absolute path (the service does not start in this directory)",
              file=sys.stderr)
        return 2
    try:
        argv = exec_argv(exec_path)
        exec_cmd = unit_command(argv)
        unit = render_unit(exec_cmd, config, user, instance)
        config_text = service_config_text(instance)
    except (ServiceInstallError, ValueError) as exc:  # ValueError: shlex, an unclosed quote in --exec
        print(f"error: --exec / --config: {exc}", file=sys.stderr)
        return 2
    name = unit_name(instance)
    envs = [(_under(prefix, path), ENV_TEMPLATE if i == 0 else INSTANCE_ENV_TEMPLATE.format(unit=name))
            for i, path in enumerate(env_files(instance))]
    if hidden_by_protect_home(exec_cmd):
        print(f"warning: {argv[0]} is under /home, /root or /run/user, which the unit hides "
              f"(ProtectHome=yes), so the service cannot start it. Install DrywallQA outside them (e.g. a "
              f"virtualenv in /opt/drywallqa) and run this again, or pass --exec.", file=sys.stderr)
    if prefix.resolve() == Path("/") and Path(argv[0]).is_absolute() and not Path(argv[0]).is_file():
        print(f"warning: {argv[0]} does not exist, so the service cannot start it (a path with blanks in --exec "
              f"needs quotes: --exec '\"/opt/my dir/bin/drywallqa\"')", file=sys.stderr)
    unit_path = _under(prefix, Path("/etc/systemd/system") / name)
    config_path = _under(prefix, config)
    real_root = prefix.resolve() == Path("/")
    if dry_run:
        print(f"# would write {unit_path}\n{unit}")
        if not config_path.exists():
            print(f"# would copy {default_config_path()} -> {config_path} (with mqtt.embedded_broker: never"
                  f"{f', and instance: {instance}' if instance else ''})")
        for env_path, template in envs:
            if not env_path.exists():
                print(f"# would write {env_path} (mode 0600)\n{template}")
        if real_root:
            print(f"# would create system user {user!r} (group video) if missing, then: systemctl daemon-reload && "
                  f"systemctl enable --now {name}")
        return 0
    if real_root and os.geteuid() != 0:
        print("error: installing into / needs root (sudo), or use --prefix DIR / --dry-run", file=sys.stderr)
        return 2
    # The config and the secrets first, then the unit that names them; existing ones are the site's: kept.
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        config_path.write_text(config_text, encoding="utf-8")
        config_path.chmod(0o644)
    for env_path, template in envs:
        env_path.parent.mkdir(parents=True, exist_ok=True)
        if not env_path.exists():
            env_path.write_text(template, encoding="utf-8")
            env_path.chmod(0o600)
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit, encoding="utf-8")
    unit_path.chmod(0o644)
    edge = shlex.join(argv[:-1]) if argv[-1] == "run" else "drywallqa edge"  # what the unit runs, less `run`
    env_args = " ".join(f"--env-file {path}" for path in env_files(instance))
    print(f"installed {unit_path}\nconfig    {config_path}\nsecrets   {', '.join(str(e) for e, _ in envs)}\n"
          f"check it: {edge} check-config --config {shlex.quote(str(config))} {env_args} --model-check")
    if real_root:
        _ensure_user(user)
        if enable and shutil.which("systemctl"):
            subprocess.run(["systemctl", "daemon-reload"], check=False)
            subprocess.run(["systemctl", "enable", "--now", name], check=False)
        print(f"status: systemctl status {name}   logs: journalctl -u {name.removesuffix('.service')} -f")
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
