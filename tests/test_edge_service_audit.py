"""A site technician installing the edge runtime as a service: what edge.env does to the settings, what the
installer says when systemd cannot start the unit, removing the unit, and a spool the unit could not write.
Everything goes into a temporary root (never the real /etc/systemd)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drywallqa.edge.cli import EXIT_CONFIG
from drywallqa.edge.settings import ConfigError


def _edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DRYWALL") and k != "NOTIFY_SOCKET"}
    return subprocess.run([sys.executable, "-m", "drywallqa.edge", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"mqtt: {{embedded_broker: never}}\nspool: {{path: {tmp_path / 's.sqlite'}}}\n"
                   f"model: {{path: {tmp_path / 'missing.onnx'}}}\n")
    return cfg


# -- edge.env mistakes systemd does not report -----------------------------------------------------------------


def test_a_misspelt_prefix_in_the_env_file_is_refused_not_ignored(tmp_path):
    """DRYWALQA_MQTT__HOST (one L) is a variable the settings never read: the service published to 127.0.0.1 and
    check-config showed the config's host without a word about the line."""
    env = tmp_path / "edge.env"
    env.write_text("OMP_NUM_THREADS=2\nDRYWALQA_MQTT__HOST=broker.site\n")
    proc = _edge("check-config", "--config", str(_config(tmp_path)), "--env-file", str(env))
    assert proc.returncode == EXIT_CONFIG, proc.stdout
    assert (f"environment variable DRYWALQA_MQTT__HOST in {env} is not read" in proc.stderr
            and "did you mean DRYWALLQA_MQTT__HOST?" in proc.stderr)

    env.write_text("OMP_NUM_THREADS=2\nDRYWALLQA_MQTT__HOST=broker.site\n")  # other programs' variables are fine
    proc = _edge("check-config", "--config", str(_config(tmp_path)), "--env-file", str(env))
    assert proc.returncode == 0, proc.stderr
    assert '"host": "broker.site"' in proc.stdout


def test_the_service_refuses_a_misspelt_prefix_in_its_environment(tmp_path):
    """The unit hands edge.env to `edge run` as its environment: the same mistake stops it with the config status
    (not restarted), naming the variable, before anything loads."""
    proc = _edge("run", "--config", str(_config(tmp_path)), "--max-frames", "1",
                 env={"DRYWALL_QA_SOURCE__URI": "/dev/video0"})
    assert proc.returncode == EXIT_CONFIG
    assert "DRYWALL_QA_SOURCE__URI is not read" in proc.stderr and "DRYWALLQA_SOURCE__URI?" in proc.stderr


def test_other_programs_drywall_variables_do_not_stop_the_service(tmp_path):
    """The check runs on the whole environment at every start. Kubernetes gives each pod <SERVICE>_SERVICE_HOST
    and <SERVICE>_PORT for every Service of its namespace (a dashboard Service named drywall-qa), and a site may
    have its own DRYWALL_* variables: none names an edge setting, so none is a misspelt prefix. Before, each one
    stopped the service with the config status (never restarted)."""
    others = {"DRYWALL_QA_SERVICE_HOST": "10.0.0.7", "DRYWALL_QA_PORT": "tcp://10.0.0.7:8080",
              "DRYWALL_SITE": "site-12", "DRYWALLQA": "1"}
    proc = _edge("check-config", "--config", str(_config(tmp_path)), env=others)
    assert proc.returncode == 0, proc.stderr
    proc = _edge("check-config", "--config", str(_config(tmp_path)),
                 env={**others, "DRYWALQA_LOG_LEVEL": "DEBUG"})  # a top-level setting, misspelt: still refused
    assert proc.returncode == EXIT_CONFIG and "DRYWALQA_LOG_LEVEL is not read" in proc.stderr, proc.stderr


@pytest.mark.parametrize("line", ['DRYWALLQA_MQTT__HOST="broker.site"  # main broker',
                                  "DRYWALLQA_MQTT__HOST=broker.site # main broker"])
def test_a_comment_after_a_value_in_the_env_file_is_an_error_naming_the_line(tmp_path, line):
    """systemd has no comment after a value: the service got the host 'broker.site# main broker' (or with the
    blank), which never resolves, while the line looked right."""
    from drywallqa.edge.envfile import read_env_file

    env = tmp_path / "edge.env"
    env.write_text(f"# the site broker\n{line}\nDRYWALLQA_MQTT__PASSWORD='p #1'\n")
    proc = _edge("check-config", "--config", str(_config(tmp_path)), "--env-file", str(env))
    assert proc.returncode == EXIT_CONFIG
    value = read_env_file(env)["DRYWALLQA_MQTT__HOST"]  # what systemd gives the service
    assert value.startswith("broker.site") and value.endswith("# main broker")
    assert f"{env}, line 2: '#' after a value does not start a comment" in proc.stderr
    assert f"systemd gives DRYWALLQA_MQTT__HOST the value {value!r}" in proc.stderr
    with pytest.raises(ConfigError, match="line 2"):
        read_env_file(env, strict=True)


def test_a_hash_inside_quotes_or_a_word_is_part_of_the_value(tmp_path):
    from drywallqa.edge.envfile import read_env_file

    env = tmp_path / "edge.env"
    env.write_text("A='p #1'\nB=\"x # y\"\nC=ab#c\nD=#x\nE=a\\ #b\n")
    assert read_env_file(env, strict=True) == {"A": "p #1", "B": "x # y", "C": "ab#c", "D": "#x", "E": "a #b"}


# -- systemd on the device -------------------------------------------------------------------------------------


def test_the_installer_fails_when_there_is_no_systemctl(tmp_path, monkeypatch, capsys):
    """Before, with no systemctl the installer skipped enabling without a word and exited 0."""
    from drywallqa.edge.service import start_unit

    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no systemctl
    assert start_unit("drywallqa-edge.service") == 1
    err = capsys.readouterr().err
    assert "no systemctl here: drywallqa-edge.service is written but not enabled" in err
    assert "sudo systemctl daemon-reload && sudo systemctl enable --now drywallqa-edge.service" in err


@pytest.mark.skipif(Path("/run/systemd/system").exists() or not Path("/usr/bin/systemctl").exists(),
                    reason="needs a systemctl on a machine where systemd does not run (it would act for real)")
def test_the_installer_fails_when_systemd_cannot_start_the_unit(capsys):
    """Before, a failed daemon-reload or start (no systemd, a unit that fails at once) still exited 0 and printed
    the status command, so a provisioning script went on as if the device ran the service."""
    from drywallqa.edge.service import start_unit

    assert start_unit("drywallqa-edge-audit.service") == 1
    err = capsys.readouterr().err
    assert "`systemctl daemon-reload` failed" in err and "drywallqa-edge-audit.service is written but not running" in err


def test_uninstall_removes_the_unit_and_keeps_the_sites_config_secrets_and_spool(tmp_path):
    root = tmp_path / "root"
    for args in ((), ("--instance", "rear", "--config", "/srv/site/rear.yaml")):
        assert _edge("install-service", "--prefix", str(root), "--exec", "/opt/dq/bin/drywallqa", *args).returncode == 0
    units = root / "etc/systemd/system"
    site_cfg = root / "srv/site/rear.yaml"
    site_cfg.write_text(site_cfg.read_text() + "\nlog_level: DEBUG\n")
    (root / "var/lib/drywallqa-edge-rear").mkdir(parents=True)
    dropin = units / "drywallqa-edge-rear.service.d"
    dropin.mkdir()
    (dropin / "override.conf").write_text("[Service]\nReadWritePaths=/data\n")

    proc = _edge("uninstall-service", "--prefix", str(root), "--instance", "rear")
    assert proc.returncode == 0, proc.stderr
    assert not (units / "drywallqa-edge-rear.service").exists()
    assert (units / "drywallqa-edge.service").is_file()  # the first camera's unit stays
    assert site_cfg.read_text().endswith("log_level: DEBUG\n")
    for kept in (site_cfg, root / "etc/drywallqa/edge-rear.env", root / "var/lib/drywallqa-edge-rear", dropin):
        assert kept.exists() and f"  {kept}\n" in proc.stdout

    again = _edge("uninstall-service", "--prefix", str(root), "--instance", "rear")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


@pytest.mark.parametrize(("spool", "warned"), [
    ("/data/alerts/spool.sqlite", "ReadWritePaths=/data/alerts"),
    ("spool.sqlite", "an absolute spool.path"),
    ("/var/lib/drywallqa-edge/spool.sqlite", None),
    ("~/spool.sqlite", None),  # the unit's HOME is its state folder: that is where this spool lies
    (None, None),
])
def test_install_warns_about_a_spool_the_unit_cannot_write(tmp_path, spool, warned):
    """ProtectSystem=strict lets the service write only its state folder: a site config kept from a manual setup
    with spool.path elsewhere ran without a durable spool, its error saying the disk was read-only."""
    root = tmp_path / "root"
    cfg = root / "etc/drywallqa/edge.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("mqtt: {embedded_broker: never}\n" + (f"spool: {{path: {spool}}}\n" if spool else ""))
    proc = _edge("install-service", "--prefix", str(root), "--exec", "/opt/dq/bin/drywallqa")
    assert proc.returncode == 0, proc.stderr
    if warned:
        assert f"sets spool.path {spool}, outside the service's state folder /var/lib/drywallqa-edge" in proc.stderr
        assert f"sudo systemctl edit drywallqa-edge.service` and add [Service] {warned}" in proc.stderr
    else:
        assert "spool.path" not in proc.stderr


def test_install_warns_about_a_config_or_files_the_unit_hides(tmp_path):
    """ProtectHome=yes hides /home, /root and /run/user from the service, and its ~ is its state folder: a config
    kept in the technician's home (or naming a model or video there) failed at the service's start with 'not
    found', for a file the technician could see."""
    root = tmp_path / "root"
    cfg = root / "home/tech/edge.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("mqtt: {embedded_broker: never}\nmodel: {path: /root/models/site.onnx}\n"
                   "source: {uri: ~/walk.mp4}\n")
    proc = _edge("install-service", "--prefix", str(root), "--exec", "/opt/dq/bin/drywallqa",
                 "--config", "/home/tech/edge.yaml")
    assert proc.returncode == 0, proc.stderr
    assert ("warning: the service cannot reach the config /home/tech/edge.yaml; model.path /root/models/site.onnx; "
            "source.uri ~/walk.mp4: the unit hides /home, /root and /run/user (ProtectHome=yes), and its ~ is "
            "/var/lib/drywallqa-edge.") in proc.stderr

    clean = _edge("install-service", "--prefix", str(tmp_path / "clean"), "--exec", "/opt/dq/bin/drywallqa")
    assert clean.returncode == 0 and "warning" not in clean.stderr


def test_an_env_file_saved_with_a_byte_order_mark_says_so(tmp_path):
    """A Windows editor's BOM glues to the first name: systemd drops that line as an invalid name. The error showed
    a name '\\ufeffDRYWALLQA_MQTT__HOST' a technician could not make sense of; now it says what it is and the fix."""
    env = tmp_path / "edge.env"
    env.write_bytes(b"\xef\xbb\xbfDRYWALLQA_MQTT__HOST=broker.site\r\nDRYWALLQA_MQTT__PORT=1884\r\n")
    proc = _edge("check-config", "--config", str(_config(tmp_path)), "--env-file", str(env))
    assert proc.returncode == EXIT_CONFIG
    assert (f"{env}, line 1: the file starts with a byte order mark (U+FEFF, written by some Windows editors): "
            f"systemd reads it as part of the name 'DRYWALLQA_MQTT__HOST' and skips this line") in proc.stderr
    fix = subprocess.run(["sed", "-i", r"1s/^\xEF\xBB\xBF//", str(env)], capture_output=True)  # the fix it gives
    assert fix.returncode == 0
    proc = _edge("check-config", "--config", str(_config(tmp_path)), "--env-file", str(env))
    assert proc.returncode == 0 and '"host": "broker.site"' in proc.stdout and '"port": 1884' in proc.stdout


def test_a_byte_order_mark_before_the_installed_files_first_comment_is_harmless(tmp_path):
    """The installer's edge.env starts with a comment, so a Windows editor puts its BOM there: systemd skips that
    first line, a comment anyway, and reads the rest. check-config refused the file, quoting a name
    '\\ufeff# Environment for ...' (the very message the BOM check was meant to replace)."""
    from drywallqa.edge.service import ENV_TEMPLATE

    env = tmp_path / "edge.env"
    env.write_bytes(b"\xef\xbb\xbf" + ENV_TEMPLATE.replace("\n", "\r\n").encode() + b"DRYWALLQA_MQTT__HOST=site\r\n")
    proc = _edge("check-config", "--config", str(_config(tmp_path)), "--env-file", str(env))
    assert proc.returncode == 0, proc.stderr
    assert '"host": "site"' in proc.stdout


def test_the_dry_run_says_the_install_restarts_a_running_service(tmp_path):
    """A reinstall restarts the unit (the new code runs at once); the dry run said `enable --now`, which leaves a
    running service on the old code, so a technician checking first was told the opposite of what happens."""
    proc = _edge("install-service", "--dry-run", "--exec", "/opt/dq/bin/drywallqa")
    assert proc.returncode == 0, proc.stderr
    assert "systemctl daemon-reload && systemctl enable drywallqa-edge.service && systemctl restart " \
           "drywallqa-edge.service" in proc.stdout and "--now" not in proc.stdout


def test_the_service_user_gets_only_groups_the_system_has(capsys):
    """useradd refuses a group the system lacks (a minimal image without 'video'): the installer stopped with a
    traceback. That group is left out of useradd and named, with how to add it (the unit's SupplementaryGroups=
    needs it)."""
    from drywallqa.edge.service import useradd_command

    cmd = useradd_command("svc", groups=("root", "drywallqa-no-such-group"))
    assert cmd[-1] == "svc" and cmd[cmd.index("--groups") + 1] == "root"
    err = capsys.readouterr().err
    assert "no 'drywallqa-no-such-group' group" in err and "groupadd --system drywallqa-no-such-group" in err
    assert "--groups" not in useradd_command("svc", groups=("drywallqa-no-such-group",))


@pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd")
def test_a_user_useradd_refuses_is_a_clear_error_not_a_traceback():
    """A name useradd refuses creates nothing: the error names the command, useradd's reason and what to do."""
    from drywallqa.edge.service import ServiceInstallError, _ensure_user

    with pytest.raises(ServiceInstallError) as info:
        _ensure_user("Not A Valid Name!")
    message = str(info.value)
    assert "cannot create the service user 'Not A Valid Name!'" in message and "useradd --system" in message
    assert "--user with an existing account" in message
