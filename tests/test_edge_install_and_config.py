"""A technician's first install: `edge check-config` on good and broken configs and environments, and
`edge install-service` into a temporary root (never the real /etc/systemd)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from drywallqa.edge.cli import EXIT_CONFIG, EXIT_START_FAILED
from drywallqa.edge.settings import ConfigError, load_settings
from drywallqa.edge.sources import SourceError


def _edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_") and k != "NOTIFY_SOCKET"}
    return subprocess.run([sys.executable, "-m", "drywallqa.edge", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def _clean_env(monkeypatch) -> None:
    for var in [v for v in os.environ if v.startswith("DRYWALLQA_")]:
        monkeypatch.delenv(var)


# -- the config file -------------------------------------------------------------------------------------------


def test_a_folder_given_as_the_config_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        load_settings(tmp_path)
    assert "not found" not in str(info.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# every setting commented out\n# mqtt:\n#   host: broker\n"])
def test_an_empty_config_file_is_refused_not_run_on_demo_defaults(tmp_path, monkeypatch, text):
    _clean_env(monkeypatch)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="holds no settings"):
        load_settings(cfg)
    (tmp_path / "defaults.yaml").write_text("{}\n")  # the explicit way to ask for the built-in defaults
    assert load_settings(tmp_path / "defaults.yaml").source.uri == "demo"


def test_a_config_that_is_not_utf8_is_one_error_line_not_a_traceback(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_bytes(b"mqtt:\n  host: caf\xe9\n")  # saved as Latin-1 by a Windows editor
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(cfg)
    proc = _edge("check-config", "--config", str(cfg))
    assert proc.returncode == EXIT_CONFIG and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: config file {cfg} is not UTF-8 text (invalid continuation "
                                                f"byte at byte 17)"]


# -- the environment -------------------------------------------------------------------------------------------


def test_a_misspelt_section_in_the_environment_is_refused(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setenv("DRYWALLQA_MQQT__HOST", "broker.site")  # would leave the device publishing to 127.0.0.1
    with pytest.raises(ConfigError, match="DRYWALLQA_MQQT__HOST is not read: 'mqqt' is not a section") as info:
        load_settings()
    assert "mqtt" in str(info.value)
    monkeypatch.delenv("DRYWALLQA_MQQT__HOST")
    monkeypatch.setenv("DRYWALLQA_DASHBOARD_TOKEN", "x")  # other tools' variables (one '_') are left alone
    assert load_settings().mqtt.host == "127.0.0.1"


def test_a_kubernetes_service_link_is_not_taken_for_a_mistyped_setting(monkeypatch):
    """Kubernetes gives every pod these for a Service named drywallqa-mqtt in its namespace (a broker beside the
    edge); DRYWALLQA_MQTT_PORT looks like mqtt.port written with one underscore, but its value is a link."""
    _clean_env(monkeypatch)
    links = {"DRYWALLQA_MQTT_SERVICE_HOST": "10.0.0.11", "DRYWALLQA_MQTT_SERVICE_PORT": "1883",
             "DRYWALLQA_MQTT_PORT": "tcp://10.0.0.11:1883", "DRYWALLQA_MQTT_PORT_1883_TCP": "tcp://10.0.0.11:1883",
             "DRYWALLQA_MQTT_PORT_1883_TCP_PORT": "1883", "DRYWALLQA_MQTT_PORT_1883_TCP_ADDR": "10.0.0.11"}
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert load_settings().mqtt.port == 1883
    monkeypatch.setenv("DRYWALLQA_MQTT_PORT", "1884")  # a number: a user's mqtt.port with one underscore
    with pytest.raises(ConfigError, match="DRYWALLQA_MQTT_PORT is not read: a setting inside a section needs '__'"):
        load_settings()


@pytest.mark.parametrize("var,value", [("DRYWALLQA_ANALYSIS__ALIASES", '{"hairline crack": crack'),
                                       ("DRYWALLQA_SOURCE__DEMO_SIZE", "480x640"),
                                       ("DRYWALLQA_MQTT", "host=broker")])
def test_environment_value_that_is_not_json_names_the_variable(monkeypatch, var, value):
    _clean_env(monkeypatch)
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"{var} is not valid JSON"):
        load_settings()


def test_a_bad_value_from_the_environment_says_so(tmp_path, monkeypatch):
    """The YAML file is not where the technician should look for `mqtt.hots`."""
    _clean_env(monkeypatch)
    monkeypatch.setenv("DRYWALLQA_MQTT__HOTS", "broker.site")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "mqtt.hots: unknown setting" in str(info.value)
    assert "set by the environment: DRYWALLQA_MQTT__HOTS" in str(info.value)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("mqtt: {port: 0}\n")
    monkeypatch.delenv("DRYWALLQA_MQTT__HOTS")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert "environment:" not in str(info.value).splitlines()[1]  # from the file: no environment named


# -- check-config agrees with run --------------------------------------------------------------------------------


def test_check_config_refuses_a_missing_video_file_as_run_does(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: {tmp_path / 'walls.mp4'}}}\nmqtt: {{embedded_broker: never, port: 1}}\n"
                   f"spool: {{path: {tmp_path / 's.sqlite'}}}\n")
    check = _edge("check-config", "--config", str(cfg))
    run = _edge("run", "--config", str(cfg), "--max-frames", "1")
    # run: retried by systemd (the file may be on a drive mounted late at boot); check-config: not a usable config
    assert check.returncode == EXIT_CONFIG and run.returncode == EXIT_START_FAILED, (check.stdout, run.stderr)
    assert "source.uri: video file not found" in check.stderr and "source.uri: video file not found" in run.stderr



def test_a_watched_video_file_in_a_mistyped_folder_stops_check_config_and_run_as_a_config_error(tmp_path):
    """Before: with watch: true, a video file in a folder that does not exist ('vidoes') passed check-config with a
    warning and `edge run` waited for it for ever. Both now exit EX_CONFIG (systemd does not restart it), naming the
    missing folder and the close one."""
    (tmp_path / "videos").mkdir()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: {tmp_path / 'vidoes' / 'site.mp4'}, watch: true}}\n"
                   f"mqtt: {{embedded_broker: never, port: 1}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n")
    check = _edge("check-config", "--config", str(cfg))
    run = _edge("run", "--config", str(cfg), "--max-frames", "1")
    assert check.returncode == EXIT_CONFIG and run.returncode == EXIT_CONFIG, (check.stderr, run.stderr)
    said = f"does not exist: {tmp_path / 'vidoes'}. Did you mean {tmp_path / 'videos'}?"
    assert said in check.stderr and said in run.stderr, (check.stderr, run.stderr)
    assert "Traceback" not in check.stderr + run.stderr


def test_a_watched_folder_not_there_yet_is_accepted_and_picked_up_when_it_appears(tmp_path):
    """A share or SD card mounted after the service starts: with watch: true the missing folder is not a 'video file
    not found' (check-config passes, the source waits for it), and its photos are read once it is there."""
    from drywallqa.edge.sources import WatchedFolderSource, make_source

    folder = tmp_path / "site-12"
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"source: {{uri: {folder}, watch: true}}\nmqtt: {{embedded_broker: never, port: 1}}\n"
                   f"spool: {{path: {tmp_path / 's.sqlite'}}}\n")
    check = _edge("check-config", "--config", str(cfg))
    assert check.returncode == 0, check.stderr
    source = make_source(str(folder), watch=True)
    assert isinstance(source, WatchedFolderSource)
    with pytest.raises(SourceError, match="folder not found"):
        source.open()
    folder.mkdir()
    cv2.imwrite(str(folder / "wall.png"), np.full((24, 32, 3), 70, np.uint8))
    os.utime(folder / "wall.png", (time.time() - 60, time.time() - 60))
    source.open()
    assert int(source.read()[0, 0, 0]) == 70

# -- install-service -------------------------------------------------------------------------------------------


def _unit(root: Path) -> str:
    return (root / "etc/systemd/system/drywallqa-edge.service").read_text()


def test_install_service_quotes_paths_with_spaces(tmp_path):
    from drywallqa.edge.service import install_service

    program = tmp_path / "Drywall QA" / "bin" / "drywallqa"
    program.parent.mkdir(parents=True)
    shutil.copy("/bin/true", program)
    root = tmp_path / "root"
    assert install_service(prefix=root, exec_path=str(program), config=Path("/etc/dry wall/edge.yaml")) == 0
    exec_line = next(ln for ln in _unit(root).splitlines() if ln.startswith("ExecStart="))
    assert exec_line == f'ExecStart="{program}" edge run --config "/etc/dry wall/edge.yaml" --wait-for-spool'
    assert (root / "etc/dry wall/edge.yaml").is_file()


def test_unit_command_escapes_what_systemd_would_expand():
    from drywallqa.edge.service import exec_argv, render_unit, systemd_quote, unit_command

    assert systemd_quote("/etc/site 50%/edge.yaml") == '"/etc/site 50%%/edge.yaml"'
    assert systemd_quote("/opt/$HOME/x") == "/opt/$$HOME/x"
    assert unit_command(exec_argv('"/opt/dry wall/bin/python3"')) == '"/opt/dry wall/bin/python3" -m drywallqa.edge run'
    assert unit_command(exec_argv("/opt/dq/bin/drywallqa edge run")) == "/opt/dq/bin/drywallqa edge run"
    unit = render_unit(unit_command(exec_argv("/opt/dq/bin/drywallqa")), Path("/etc/dq/%n.yaml"), "drywallqa")
    assert "ExecStart=/opt/dq/bin/drywallqa edge run --config /etc/dq/%%n.yaml --wait-for-spool\n" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_with_spaces_in_its_paths_passes_systemd_analyze_verify(tmp_path):
    from drywallqa.edge.service import install_service

    program = tmp_path / "Drywall QA" / "drywallqa"
    program.parent.mkdir()
    shutil.copy("/bin/true", program)
    root = tmp_path / "root"
    assert install_service(prefix=root, exec_path=str(program), config=Path("/etc/dry wall/edge.yaml"),
                           user="root") == 0
    copy = tmp_path / "drywallqa-edge.service"
    copy.write_text(_unit(root))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in proc.stderr.splitlines() if "drywallqa-edge.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_install_service_with_the_config_outside_etc_drywallqa(tmp_path):
    """The secrets file /etc/drywallqa/edge.env is written even when the config lives elsewhere."""
    proc = _edge("install-service", "--prefix", str(tmp_path), "--config", "/srv/site/edge.yaml",
                 "--exec", "/opt/dq/bin/drywallqa")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srv/site/edge.yaml").is_file()
    assert stat.S_IMODE((tmp_path / "etc/drywallqa/edge.env").stat().st_mode) == 0o600
    assert "--config /srv/site/edge.yaml" in _unit(tmp_path)
    # the file the service reads, not the packaged default that a bare `check-config` would check
    assert ("/opt/dq/bin/drywallqa edge check-config --config /srv/site/edge.yaml --env-file /etc/drywallqa/edge.env "
            "--model-check") in proc.stdout


def test_install_service_refuses_a_relative_config_path(tmp_path):
    proc = _edge("install-service", "--prefix", str(tmp_path), "--config", "edge.yaml")
    assert proc.returncode == 2 and "absolute path" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "etc").exists()


def test_reinstalling_keeps_the_sites_config_and_secrets_and_renews_the_unit(tmp_path):
    from drywallqa.edge.service import install_service

    assert install_service(prefix=tmp_path, exec_path="/opt/old/bin/drywallqa") == 0
    config, env = tmp_path / "etc/drywallqa/edge.yaml", tmp_path / "etc/drywallqa/edge.env"
    config.write_text("mqtt: {host: broker.site, embedded_broker: never}\n")
    env.write_text("DRYWALLQA_MQTT__PASSWORD=s3cret\n")
    assert install_service(prefix=tmp_path, exec_path="/opt/new/bin/drywallqa") == 0
    assert config.read_text() == "mqtt: {host: broker.site, embedded_broker: never}\n"
    assert env.read_text() == "DRYWALLQA_MQTT__PASSWORD=s3cret\n"
    assert "ExecStart=/opt/new/bin/drywallqa edge run" in _unit(tmp_path) and "/opt/old" not in _unit(tmp_path)


# -- the service's environment file and exit statuses --------------------------------------------------------------


def test_env_file_is_read_with_systemd_syntax(tmp_path):
    from drywallqa.edge.envfile import read_env_file

    env = tmp_path / "edge.env"
    env.write_text('# secrets\n; also a comment\n\nDRYWALLQA_MQTT__HOST = broker.site  \n'
                   'DRYWALLQA_MQTT__PASSWORD="p#ss \\"w\\" $x "\n'
                   "DRYWALLQA_MQTT__USERNAME='edge user'\n"
                   'DRYWALLQA_ANALYSIS__PROMPTS=["segment crack", \\\n"segment taping area"]\n'
                   "DRYWALLQA_MQTT__HOST=later.wins\n")
    assert read_env_file(env) == {
        "DRYWALLQA_MQTT__HOST": "later.wins",
        "DRYWALLQA_MQTT__PASSWORD": 'p#ss "w" $x ',
        "DRYWALLQA_MQTT__USERNAME": "edge user",
        "DRYWALLQA_ANALYSIS__PROMPTS": '["segment crack", "segment taping area"]',
    }


@pytest.mark.parametrize(("line", "value"), [  # what systemd (src/basic/env-file.c) gives the service
    (r"A=/data/site\ walk.mp4", "/data/site walk.mp4"),  # unquoted: a backslash takes the next character
    (r"A=pa\\ss", "pa\\ss"),
    (r"A=abc\\", "abc\\"),
    (r'A="a\b\"c"', 'a\\b"c'),  # double quotes: the backslash stays before a character it need not escape
    ("A='abc\\\ndef'", "abc\\\ndef"),  # single quotes: literal, across lines
    ('A="a"b', "ab"),  # text after a closing quote goes on
    ('A="x"   # c', "x# c"),
    ("A=  spaced value  ", "spaced value"),
])
def test_env_file_values_are_what_systemd_gives_the_service(tmp_path, line, value):
    from drywallqa.edge.envfile import read_env_file

    env = tmp_path / "edge.env"
    env.write_text(line + "\nB=1\n")
    assert read_env_file(env) == {"A": value, "B": "1"}


@pytest.mark.parametrize(("text", "message"), [
    ("A=1\nexport DRYWALLQA_MQTT__HOST=x\n", "line 2: expected NAME=VALUE, got a name 'export DRYWALLQA_MQTT__HOST'"),
    ("\n\nDRYWALLQA_MQTT__HOST\n", "line 3: expected NAME=VALUE"),
    ('DRYWALLQA_MQTT__PASSWORD="unclosed\nB=1\n', "line 1: the quote that opens the value is never closed"),
    ("# old broker \\\nDRYWALLQA_MQTT__HOST=x\n", "line 1: a comment ends in a backslash"),
])
def test_a_line_systemd_would_skip_is_an_error_naming_it(tmp_path, text, message):
    from drywallqa.edge.envfile import read_env_file

    env = tmp_path / "edge.env"
    env.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{env}, {message}")):
        read_env_file(env)


def test_check_config_with_the_env_file_sees_what_the_service_sees(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"mqtt: {{embedded_broker: never}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n")
    env = tmp_path / "edge.env"
    env.write_text("DRYWALLQA_MQTT__HOST=broker.site\nDRYWALLQA_MQTT__PASSWORD=secret\n")
    shell = {"DRYWALLQA_SOURCE__URI": str(tmp_path / "missing.mp4")}  # set in this shell only
    plain = _edge("check-config", "--config", str(cfg), env=shell)
    assert plain.returncode == EXIT_CONFIG and "video file not found" in plain.stderr

    proc = _edge("check-config", "--config", str(cfg), "--env-file", str(env), env=shell)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)
    assert settings["mqtt"]["host"] == "broker.site" and settings["mqtt"]["password"] == "***"
    assert settings["source"]["uri"] == "demo"
    assert "ignoring DRYWALLQA_SOURCE__URI from this shell" in proc.stderr

    env.write_text("DRYWALLQA_MQTT__PORT=seventeen\n")
    bad = _edge("check-config", "--config", str(cfg), "--env-file", str(env))
    assert bad.returncode == EXIT_CONFIG and "DRYWALLQA_MQTT__PORT" in bad.stderr and "Traceback" not in bad.stderr
    missing = _edge("check-config", "--config", str(cfg), "--env-file", str(tmp_path / "nope.env"))
    assert missing.returncode == EXIT_CONFIG and "environment file not found" in missing.stderr


def test_check_config_finds_a_profile_where_the_env_files_drywallqa_home_says(tmp_path):
    """DRYWALLQA_HOME in /etc/drywallqa/edge.env moves where `lite` and `hrnet` are looked for, for the service; with
    --env-file, check-config must look there too, and not where this shell's own DRYWALLQA_HOME points."""
    from _foundation_fixtures import random_onnx

    home = tmp_path / "home"
    (home / "models" / "exported").mkdir(parents=True)
    shutil.copy(random_onnx(), home / "models" / "exported" / "lite_effnet_lite0.onnx")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("model: {path: lite, backend: onnxruntime}\nmqtt: {embedded_broker: never}\n")
    env = tmp_path / "edge.env"
    env.write_text(f"DRYWALLQA_HOME={home}\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DRYWALLQA_")}

    def drywallqa_edge(*args: str, **env: str) -> subprocess.CompletedProcess:  # as the unit runs it: `drywallqa edge`
        return subprocess.run([sys.executable, "-c", "import sys; from drywallqa.cli import main; sys.exit(main())",
                               "edge", *args], env={**base, **env}, capture_output=True, text=True, timeout=120)

    proc = drywallqa_edge("check-config", "--config", str(cfg), "--model-check", "--env-file", str(env))
    assert proc.returncode == 0, proc.stderr
    assert f"model {home / 'models' / 'exported' / 'lite_effnet_lite0.onnx'}:" in proc.stdout

    env.write_text("DRYWALLQA_MQTT__HOST=broker.site\n")  # the service would not see the shell's DRYWALLQA_HOME
    shell = drywallqa_edge("check-config", "--config", str(cfg), "--model-check", "--env-file", str(env),
                           DRYWALLQA_HOME=str(home))
    assert "ignoring DRYWALLQA_HOME from this shell" in shell.stderr
    assert str(home) not in shell.stdout + shell.stderr.replace("ignoring DRYWALLQA_HOME", "")


def test_the_unit_does_not_restart_the_config_exit_status():
    from drywallqa.edge.service import ENV_FILE, unit_template_path

    unit = unit_template_path().read_text()
    assert f"RestartPreventExitStatus={EXIT_CONFIG}\n" in unit and "Restart=on-failure\n" in unit
    assert f"EnvironmentFile=-{ENV_FILE}\n" in unit


def test_the_unit_leaves_cameras_and_the_jetson_gpu_reachable():
    """/dev/video* and the Jetson GPU (/dev/nvmap, /dev/nvhost-*) must stay open to the service. Any device
    allow-list closes the device cgroup to all it does not list: PrivateDevices=yes, DeviceAllow=, a closed or
    strict DevicePolicy=, and ProtectClock=yes, which implies DeviceAllow=char-rtc r (systemd#18142: so on systemd
    249, JetPack 6's, the camera and the GPU fail with EPERM)."""
    from drywallqa.edge.service import unit_template_path

    settings = {}
    for line in unit_template_path().read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    assert settings.get("ProtectClock", "no") in ("no", "false", "0", "off")
    assert settings.get("PrivateDevices", "no") in ("no", "false", "0", "off")
    assert "DeviceAllow" not in settings
    assert settings.get("DevicePolicy", "auto") == "auto"
    assert "video" in settings.get("SupplementaryGroups", "").split()


def test_a_start_failure_a_restart_may_cure_is_not_the_config_status(tmp_path):
    """The embedded broker's port is held by another program: exit 1, which systemd retries (not 78)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = tmp_path / "edge.yaml"
        cfg.write_text(f"mqtt: {{embedded_broker: always, host: 127.0.0.1, port: {port}}}\n"
                       f"spool: {{path: {tmp_path / 's.sqlite'}}}\n")
        proc = _edge("run", "--config", str(cfg), "--max-frames", "1")
    assert proc.returncode == EXIT_START_FAILED, proc.stderr
    assert "the service retries this" in proc.stderr and f"127.0.0.1:{port} is taken by another program" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_embedded_broker_the_settings_cannot_have_is_the_config_status(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"mqtt: {{embedded_broker: always, host: broker.site}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n")
    proc = _edge("run", "--config", str(cfg), "--max-frames", "1")
    assert proc.returncode == EXIT_CONFIG and "needs mqtt.host on loopback" in proc.stderr, proc.stderr


# -- a further camera of one device ---------------------------------------------------------------------------------


def test_a_second_camera_gets_its_own_unit_config_device_id_state_and_environment(tmp_path):
    """`install-service --instance rear`: a robot's second camera runs as drywallqa-edge-rear.service beside the
    first, with its own config and device id (one MQTT client id each), its own state folder (its own alert spool,
    which one runtime locks) and an environment file read after the shared one; the first camera's files stay."""
    assert _edge("install-service", "--prefix", str(tmp_path), "--exec", "/opt/dq/bin/drywallqa").returncode == 0
    proc = _edge("install-service", "--prefix", str(tmp_path), "--exec", "/opt/dq/bin/drywallqa", "--instance", "rear")
    assert proc.returncode == 0, proc.stderr
    first = _unit(tmp_path)
    unit = (tmp_path / "etc/systemd/system/drywallqa-edge-rear.service").read_text()
    lines = unit.splitlines()
    assert "ExecStart=/opt/dq/bin/drywallqa edge run --config /etc/drywallqa/edge-rear.yaml --wait-for-spool" in lines
    assert "StateDirectory=drywallqa-edge-rear" in lines and "Environment=HOME=/var/lib/drywallqa-edge-rear" in lines
    envs = [ln for ln in lines if ln.startswith("EnvironmentFile=")]
    assert envs == ["EnvironmentFile=-/etc/drywallqa/edge.env", "EnvironmentFile=-/etc/drywallqa/edge-rear.env"]
    assert "journalctl -u drywallqa-edge-rear" in unit and "RestartPreventExitStatus=78" in lines
    assert "Description=DrywallQA edge runtime, camera rear (camera -> segmentation -> MQTT alerts)" in lines
    assert "StateDirectory=drywallqa-edge" in first.splitlines() and "edge-rear" not in first  # the first unit stays
    config = tmp_path / "etc/drywallqa/edge-rear.yaml"
    settings = load_settings(config)
    assert settings.instance == "rear" and settings.mqtt.embedded_broker == "never"
    assert settings.mqtt.device_id == f"{socket.gethostname()}-rear"  # read at start: a cloned device gets its own
    assert "device_id:" not in config.read_text().replace("# device_id:", "")
    assert load_settings(tmp_path / "etc/drywallqa/edge.yaml").mqtt.device_id == socket.gethostname()
    env = tmp_path / "etc/drywallqa/edge-rear.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert ("check-config --config /etc/drywallqa/edge-rear.yaml --env-file /etc/drywallqa/edge.env "
            "--env-file /etc/drywallqa/edge-rear.env --model-check") in proc.stdout


def test_check_config_reads_two_env_files_the_later_winning(tmp_path):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"mqtt: {{embedded_broker: never}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n")
    shared, own = tmp_path / "edge.env", tmp_path / "edge-rear.env"
    shared.write_text("DRYWALLQA_MQTT__HOST=broker.site\nDRYWALLQA_MQTT__PORT=1884\n")
    own.write_text("DRYWALLQA_MQTT__PORT=1885\n")
    proc = _edge("check-config", "--config", str(cfg), "--env-file", str(shared), "--env-file", str(own))
    assert proc.returncode == 0, proc.stderr
    mqtt = json.loads(proc.stdout)["mqtt"]
    assert (mqtt["host"], mqtt["port"]) == ("broker.site", 1885)


@pytest.mark.parametrize("name", ["Rear", "rear cam", "-rear", "x" * 33, "../etc", "rear.1", ""])
def test_an_instance_name_that_cannot_name_a_unit_is_refused(tmp_path, name):
    proc = _edge("install-service", "--prefix", str(tmp_path), "--instance", name)
    assert proc.returncode == 2 and "--instance" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "etc").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_a_second_cameras_unit_passes_systemd_analyze_verify(tmp_path):
    from drywallqa.edge.service import install_service

    root = tmp_path / "root"
    assert install_service(prefix=root, exec_path="/bin/true", user="root", instance="cam-2") == 0
    copy = tmp_path / "drywallqa-edge-cam-2.service"
    copy.write_text((root / "etc/systemd/system/drywallqa-edge-cam-2.service").read_text())
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in proc.stderr.splitlines() if "drywallqa-edge-cam-2.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_an_instance_names_the_device_id_unless_one_is_set(tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("instance: front\n")
    assert load_settings(cfg).mqtt.device_id == f"{socket.gethostname()}-front"
    cfg.write_text("instance: front\nmqtt: {device_id: robot-7-front}\n")
    assert load_settings(cfg).mqtt.device_id == "robot-7-front"
    monkeypatch.setenv("DRYWALLQA_MQTT__DEVICE_ID", "from-env")
    assert load_settings(cfg).mqtt.device_id == "from-env"
    monkeypatch.delenv("DRYWALLQA_MQTT__DEVICE_ID")
    cfg.write_text("mqtt: {embedded_broker: never}\n")
    monkeypatch.setenv("DRYWALLQA_INSTANCE", "rear")
    assert load_settings(cfg).mqtt.device_id == f"{socket.gethostname()}-rear"
    cfg.write_text("instance: Rear Cam\n")
    monkeypatch.delenv("DRYWALLQA_INSTANCE")
    with pytest.raises(ConfigError, match="instance: .*lower-case letters"):
        load_settings(cfg)


def test_a_device_id_longer_than_the_dashboard_takes_is_a_config_error(tmp_path, monkeypatch):
    """The dashboard refuses ids over MAX_ID_CHARS (a topic level two devices must not share once clipped), so a device
    with a longer one would publish into the void: refused at start instead, naming the limit."""
    from drywallqa.edge.payloads import MAX_ID_CHARS

    _clean_env(monkeypatch)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"mqtt: {{device_id: {'a' * MAX_ID_CHARS}}}\n")
    assert load_settings(cfg).mqtt.device_id == "a" * MAX_ID_CHARS
    cfg.write_text(f"mqtt: {{device_id: {'a' * (MAX_ID_CHARS + 1)}}}\n")
    with pytest.raises(ConfigError, match=f"is {MAX_ID_CHARS + 1} characters long: at most {MAX_ID_CHARS}"):
        load_settings(cfg)


def test_each_camera_has_its_own_default_spool(tmp_path, monkeypatch):
    """Two cameras run by hand (no systemd state folder) must not meet on one spool, which one runtime locks."""
    from drywallqa.edge.settings import SpoolSettings

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert SpoolSettings().resolved_path() == tmp_path / "drywallqa" / "spool.sqlite"
    assert SpoolSettings().resolved_path("rear") == tmp_path / "drywallqa" / "spool-rear.sqlite"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "drywallqa-edge-rear"))  # the unit's own folder
    assert SpoolSettings().resolved_path("rear") == tmp_path / "drywallqa-edge-rear" / "spool.sqlite"
    assert SpoolSettings(path=str(tmp_path / "x.sqlite")).resolved_path("rear") == tmp_path / "x.sqlite"
