"""`drywallqa edge install-service`: render systemd/drywallqa-edge.service and install it (or print it)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from drywallqa.edge.settings import INSTANCE_NAME, ConfigError, default_config_path, read_config_file
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


def in_protected_home(path: Path) -> bool:
    return any(path == home or home in path.parents for home in PROTECTED_HOMES)


def hidden_by_protect_home(exec_cmd: str) -> bool:
    """The unit sets ProtectHome=yes, so a command under /home or /root cannot start as the service."""
    return in_protected_home(Path(shlex.split(exec_cmd)[0]))


# The settings that name a file or folder of the device.
PATH_SETTINGS = ("model.path", "source.uri", "spool.path", "mqtt.tls.ca_certs", "mqtt.tls.certfile", "mqtt.tls.keyfile")


def read_config(config_path: Path) -> dict:
    """The config's settings as a dict; {} when there is none to read (`edge check-config` reports a broken one)."""
    try:
        return read_config_file(config_path)
    except ConfigError:
        return {}


def setting(data: dict, dotted: str) -> object:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def hidden_from_service(config: Path, data: dict) -> list[str]:
    """What the service cannot reach: the config itself, or a path a setting names, under /home, /root or
    /run/user (ProtectHome=yes hides them) or under `~` (the service's home is its state folder, which is the
    right place for spool.path only)."""
    found = [f"the config {config}"] if in_protected_home(config) else []
    for dotted in PATH_SETTINGS:
        value = setting(data, dotted)
        if not isinstance(value, str) or (dotted == "spool.path" and _home_relative(value) is not None):
            continue
        if value.startswith("~") or in_protected_home(Path(value)):
            found.append(f"{dotted} {value}")
    return found


def _home_relative(value: str) -> str | None:
    """What follows `~` or `~/` in a path (the service's own home), else None (`~user/x` is another's home)."""
    if value == "~":
        return ""
    return value[2:] if value.startswith("~/") else None


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
            then = (f"systemctl daemon-reload && systemctl enable {name} && systemctl restart {name}" if enable
                    else "nothing more (--no-enable)")
            print(f"# would create system user {user!r} (group video) if missing, then: {then}")
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
    _warn_unreachable(config, config_path, instance)
    edge = shlex.join(argv[:-1]) if argv[-1] == "run" else "drywallqa edge"  # what the unit runs, less `run`
    env_args = " ".join(f"--env-file {path}" for path in env_files(instance))
    print(f"installed {unit_path}\nconfig    {config_path}\nsecrets   {', '.join(str(e) for e, _ in envs)}\n"
          f"check it: {edge} check-config --config {shlex.quote(str(config))} {env_args} --model-check")
    if real_root:
        try:
            _ensure_user(user)
        except ServiceInstallError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if enable:
            return start_unit(name)
        print(f"not started (--no-enable): sudo systemctl daemon-reload && sudo systemctl enable --now {name}")
    return 0


def start_unit(name: str) -> int:
    """daemon-reload, enable and (re)start the unit: a reinstall (a new --exec, an upgraded DrywallQA) runs the new
    unit and code at once, not from the next reboot. 0, or 1 with what to do when systemd could not."""
    logs = f"journalctl -u {name.removesuffix('.service')}"
    if not shutil.which("systemctl"):
        print(f"error: no systemctl here: {name} is written but not enabled. On a device that runs systemd: "
              f"sudo systemctl daemon-reload && sudo systemctl enable --now {name}", file=sys.stderr)
        return 1
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", name], ["systemctl", "restart", name]):
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"error: `{shlex.join(cmd)}` failed (its message is above): {name} is written but not running. "
                  f"See `systemctl status {name}` and `{logs}`, fix the cause, then install again (or use "
                  f"--no-enable where systemd does not run)", file=sys.stderr)
            return 1
    print(f"status: systemctl status {name}   logs: {logs} -f")
    return 0


def spool_outside_state(data: dict, instance: str | None = None) -> Path | None:
    """The config's spool.path when it lies outside the unit's state folder, else None. ProtectSystem=strict
    leaves the service nothing else to write: the spool would not open (a read-only file system, says the runtime,
    though the disk is not) and undelivered alerts would live in memory only, lost at the next restart."""
    path = setting(data, "spool.path")
    if not path:
        return None
    rest = _home_relative(str(path))
    path = Path(str(path)) if rest is None else state_dir(instance) / rest  # the unit's HOME is its state folder
    return None if path.is_absolute() and state_dir(instance) in path.parents else path


def _warn_unreachable(config: Path, config_path: Path, instance: str | None) -> None:
    """Warn about what the config names that the unit's sandbox keeps from the service (`config_path`: the file
    as installed, under --prefix)."""
    data = read_config(config_path)
    name, state = unit_name(instance), state_dir(instance)
    hidden = hidden_from_service(config, data)
    if hidden:
        print(f"warning: the service cannot reach {'; '.join(hidden)}: the unit hides /home, /root and /run/user "
              f"(ProtectHome=yes), and its ~ is {state}. Move them outside (e.g. /etc/drywallqa, /srv/drywallqa) "
              f"and name them there", file=sys.stderr)
    path = spool_outside_state(data, instance)
    if path is None or any(h.startswith("spool.path ") for h in hidden):
        return
    where = f"ReadWritePaths={path.parent}" if path.is_absolute() else "an absolute spool.path"
    print(f"warning: {config_path} sets spool.path {path}, outside the service's state folder {state}, the only "
          f"place the unit lets it write (ProtectSystem=strict): its alert spool would not open and undelivered "
          f"alerts would be lost at a restart. Remove spool.path (the service then keeps its spool in {state}), or "
          f"run `sudo systemctl edit {name}` and add [Service] {where}", file=sys.stderr)


SERVICE_GROUPS = ("video",)  # the unit's SupplementaryGroups=: cameras (/dev/video*) and the Jetson GPU


def useradd_command(user: str, groups: tuple[str, ...] = SERVICE_GROUPS) -> list[str]:
    """The useradd that creates the service user; only groups this system has (useradd refuses an unknown one)."""
    import grp

    known = []
    for group in groups:
        try:
            grp.getgrnam(group)
            known.append(group)
        except KeyError:
            print(f"warning: this system has no {group!r} group, which the unit's SupplementaryGroups= needs "
                  f"(without it systemd cannot start the unit): sudo groupadd --system {group}, then install again",
                  file=sys.stderr)
    return (["useradd", "--system", "--no-create-home", "--home-dir", str(state_dir()), "--shell",
             "/usr/sbin/nologin", "--user-group"] + (["--groups", ",".join(known)] if known else []) + [user])


def _ensure_user(user: str) -> None:
    """Create the service user when missing; ServiceInstallError saying what to do when useradd cannot."""
    import pwd

    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    cmd = useradd_command(user)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        why = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        raise ServiceInstallError(f"cannot create the service user {user!r} ({shlex.join(cmd)}: {why}); create it "
                                  f"by hand, or pass --user with an existing account, then install again") from exc


def state_dir(instance: str | None = None) -> Path:
    """The unit's StateDirectory= (its alert spool, a watched folder's record)."""
    return Path("/var/lib") / unit_name(instance).removesuffix(".service")


def installed_config(unit_text: str) -> Path | None:
    """The --config an installed unit's ExecStart= names (systemd quoting undone), or None."""
    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            try:
                words = shlex.split(line.removeprefix("ExecStart=").replace("%%", "%").replace("$$", "$"))
            except ValueError:
                return None
            if "--config" in words[:-1]:
                return Path(words[words.index("--config") + 1])
    return None


def uninstall_service(*, prefix: Path = Path("/"), instance: str | None = None) -> int:
    """Stop, disable and remove the unit. The config, the secrets and the state folder (undelivered alerts) stay:
    they are the site's, and an install again takes them up."""
    try:
        check_instance(instance)
    except ServiceInstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = unit_name(instance)
    unit_path = _under(prefix, Path("/etc/systemd/system") / name)
    real_root = prefix.resolve() == Path("/")
    if not unit_path.is_file():
        print(f"nothing to remove: {unit_path} is not there (another --instance?)")
        return 0
    if real_root and os.geteuid() != 0:
        print("error: removing the service from / needs root (sudo), or use --prefix DIR", file=sys.stderr)
        return 2
    config = installed_config(unit_path.read_text(encoding="utf-8")) or default_config(instance)
    if real_root and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", name], check=False)
    unit_path.unlink()
    if real_root and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        subprocess.run(["systemctl", "reset-failed", name], check=False, stderr=subprocess.DEVNULL)
    kept = [_under(prefix, path) for path in (config, *env_files(instance), state_dir(instance))]
    kept.append(unit_path.with_name(f"{name}.d"))  # the site's drop-ins (systemctl edit)
    print(f"removed {unit_path}\nkept (the site's config, secrets, undelivered alerts and drop-ins; delete them by "
          f"hand if unwanted, an install again takes them up):\n"
          + "\n".join(f"  {path}" for path in kept if path.exists()))
    return 0

