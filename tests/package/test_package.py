"""The installable tapdiskd: man pages that say what the programs do (every
option and command their --help lists, checked against the rendered page so
they cannot drift; mandoc's lint clean), `make install` / `make uninstall`
installing and removing exactly the documented set, the systemd unit as
`systemd-analyze verify` sees it once installed, and the Debian package as
dpkg-buildpackage builds it and lintian judges it."""

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("TAPDISKD_BIN_DIR", os.path.join(ROOT, "build", "bin"))
MAN = os.path.join(ROOT, "docs", "man")
PAGES = ["tapdiskd.8", "tap-ctl.8", "vhd-util.8", "cbt-util.8", "block-tap.8"]


def run(*cmd, check=True, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s%s" % (" ".join(map(str, cmd)), r.returncode,
                                                        r.stdout, r.stderr))
    return r


def rendered(page):
    """The page as a reader sees it: mandoc's text, overstrike removed."""
    out = run("mandoc", "-T", "ascii", os.path.join(MAN, page)).stdout
    return re.sub(".\b", "", out)


def options(text):
    """Every -x and --long-option token in a usage or help text."""
    return set(re.findall(r"(?<![\w=-])(--?[A-Za-z][A-Za-z-]*[A-Za-z]|-[A-Za-z])(?![\w-])", text))


def has_token(text, tok):
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(tok), text) is not None


def usage_of(*cmd):
    r = run(*cmd, check=False)
    return r.stdout + r.stderr


def sections(text, names):
    """Splits a rendered COMMANDS list into {command: its items' text}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^     (\S+)", line)
        if m and m.group(1) in names:
            cur = m.group(1)
        elif m or re.match(r"^[A-Z]", line):
            cur = None if not line.startswith("      ") else cur
        if cur:
            out[cur] = out.get(cur, "") + line + "\n"
    return out


@pytest.mark.parametrize("page", PAGES)
def test_man_page_lint_has_nothing_worse_than_style(page):
    r = run("mandoc", "-T", "lint", "-W", "warning", os.path.join(MAN, page), check=False)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "mandoc.db" not in line]
    assert not problems, "\n".join(problems)


def test_tapdiskd_page_has_every_option_of_help():
    helptext = run(os.path.join(BIN, "tapdiskd"), "--help").stdout
    page = rendered("tapdiskd.8")
    opts = options(helptext)
    assert {"--state-dir", "-s", "--metrics-timeout", "--xen-sim", "-V"} <= opts, opts
    missing = sorted(o for o in opts if not has_token(page, o))
    assert not missing, "tapdiskd(8) does not document %s" % missing
    for section in ("EXAMPLES", "FILES", "ENVIRONMENT", "SIGNALS"):
        assert re.search("^%s$" % section, page, re.M), section


def _commands(helptext):
    return re.findall(r"^  ([a-z][a-z-]+)\s", helptext, re.M)


def _check_command_pages(prog, page_name, minimum):
    helptext = run(os.path.join(BIN, prog), "--help").stdout
    commands = _commands(helptext)
    assert set(minimum) <= set(commands), commands
    page = rendered(page_name)
    items = sections(page, commands)
    usage = {cmd: options(usage_of(os.path.join(BIN, prog), cmd, "-h").split(cmd, 1)[1])
             for cmd in commands}
    # an option every command takes may be documented once, before the commands
    common = set.intersection(*usage.values())
    preamble = page.split("\nCOMMANDS\n", 1)[0]
    missing = ["every command's %s" % o for o in common if not has_token(preamble, o)]
    for cmd in commands:
        if cmd not in items:
            missing.append(cmd)
            continue
        for opt in usage[cmd] - common:
            if not has_token(items[cmd], opt):
                missing.append("%s %s" % (cmd, opt))
    assert not missing, "%s does not document: %s" % (page_name, missing)
    for opt in options(helptext.split("commands:")[0]):
        assert has_token(page, opt), "%s does not document %s" % (page_name, opt)
    for section in ("EXAMPLES", "EXIT STATUS"):
        assert re.search("^%s$" % section, page, re.M), section


def test_tap_ctl_page_has_every_command_and_its_flags():
    _check_command_pages("tap-ctl", "tap-ctl.8", ["create", "destroy", "stats", "qos", "top"])


def test_vhd_util_page_has_every_command_and_its_flags():
    _check_command_pages("vhd-util", "vhd-util.8", ["create", "snapshot", "check", "coalesce"])


def test_cbt_util_page_has_every_command_and_its_flags():
    _check_command_pages("cbt-util", "cbt-util.8", ["create", "get", "set", "coalesce"])


def test_block_tap_page_has_its_commands_and_environment():
    script = os.path.join(ROOT, "contrib", "xl-hotplug", "block-tap")
    usage = usage_of(script, "bogus")
    commands = re.search(r"\s(\w+(?:\|\w+)+)\s*$", usage.strip()).group(1).split("|")
    assert commands == ["add", "remove"], usage
    with open(script) as f:
        env = set(re.findall(r"\$\{([A-Z][A-Z_]+):-", f.read()))
    assert {"XENBUS_PATH", "TAPDISKD_STATE_DIR", "TAP_CTL", "XENSTORE_PREFIX"} <= env, env
    page = rendered("block-tap.8")
    items = sections(page, commands)
    assert set(items) == set(commands), items.keys()
    env_section = page.split("\nENVIRONMENT\n", 1)[1].split("\nFILES\n", 1)[0]
    missing = sorted(v for v in env if not has_token(env_section, v))
    assert not missing, "block-tap(8) ENVIRONMENT lacks %s" % missing


def _files_under(d):
    return sorted(os.path.relpath(os.path.join(dp, f), d)
                  for dp, _, fs in os.walk(d) for f in fs)


BINARIES = ("tapdiskd", "tap-ctl", "vhd-util", "cbt-util")
EXPECTED = (["usr/local/sbin/" + b for b in BINARIES] +
            ["etc/xen/scripts/block-tap", "etc/default/tapdiskd",
             "usr/local/lib/systemd/system/tapdiskd.service"] +
            ["usr/local/share/man/man8/" + p for p in PAGES] +
            ["usr/local/share/tapdiskd/schema/" + os.path.basename(p)
             for p in glob.glob(os.path.join(ROOT, "schema", "*.json"))])


def test_make_install_and_uninstall_are_exact(tmp_path):
    dest = tmp_path / "root"
    run("make", "-s", "-C", ROOT, "install", "DESTDIR=%s" % dest)
    assert _files_under(dest) == sorted(EXPECTED)
    unit = (dest / "usr/local/lib/systemd/system/tapdiskd.service").read_text()
    assert "ExecStart=/usr/local/sbin/tapdiskd --foreground" in unit
    for b in BINARIES:
        assert os.access(dest / "usr/local/sbin" / b, os.X_OK)
    assert os.access(dest / "etc/xen/scripts/block-tap", os.X_OK)
    run("make", "-s", "-C", ROOT, "uninstall", "DESTDIR=%s" % dest)
    assert _files_under(dest) == []
    assert not (dest / "usr/local/share/tapdiskd").exists()


def test_installed_unit_passes_systemd_analyze_verify(tmp_path):
    # installed under a prefix of its own: ExecStart and the man pages that
    # Documentation= names are really there for verify to find
    prefix = tmp_path / "usr"
    run("make", "-s", "-C", ROOT, "install", "PREFIX=%s" % prefix,
        "XENSCRIPTS=%s" % (tmp_path / "xen"), "DEFAULTDIR=%s" % (tmp_path / "default"))
    unit = prefix / "lib/systemd/system/tapdiskd.service"
    env = dict(os.environ, MANPATH=str(prefix / "share/man"), SYSTEMD_LOG_LEVEL="notice")
    r = run("systemd-analyze", "verify", unit, env=env, check=False)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    text = unit.read_text()
    for line in ("Type=notify", "RuntimeDirectory=tapdiskd", "LimitNOFILE=1048576",
                 "Restart=on-failure", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "ProtectHome=yes", "ProtectKernelTunables=yes"):
        assert line in text.splitlines(), line
    assert "PrivateDevices" not in text, "gntdev, evtchn and block devices must stay reachable"


@pytest.fixture(scope="module")
def deb():
    run(os.path.join(ROOT, "scripts", "build-deb"))
    debs = glob.glob(os.path.join(ROOT, "build", "deb", "tapdiskd_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def test_deb_is_lintian_clean(deb):
    changes = glob.glob(os.path.join(os.path.dirname(deb), "tapdiskd_*.changes"))[0]
    r = run("lintian", "--fail-on", "error,warning", changes, check=False)
    bad = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert r.returncode == 0 and not bad, r.stdout + r.stderr


def test_deb_contents_dependencies_and_conffiles(deb):
    info = run("dpkg-deb", "-f", deb, "Depends", "Package", "Version").stdout
    version = re.search(r"^Version: (.*)$", info, re.M).group(1)
    assert os.path.basename(deb) == "tapdiskd_%s_amd64.deb" % version
    depends = re.search(r"^Depends: (.*)$", info, re.M).group(1)
    for lib in ("libevent-2.1-7", "libjansson4", "liburing2", "libxenstore4", "libxengnttab1",
                "libxenevtchn1", "libsystemd0", "libuuid1", "zlib1g", "librbd1", "librados2",
                "libgnutls30"):
        assert lib in depends, (lib, depends)
    files = run("dpkg-deb", "-c", deb).stdout
    for path in (["./usr/sbin/" + b for b in BINARIES] +
                 ["./usr/share/man/man8/" + p + ".gz" for p in PAGES] +
                 ["./etc/xen/scripts/block-tap", "./lib/systemd/system/tapdiskd.service",
                  "./usr/share/tapdiskd/schema/vbd.json"]):
        assert path in files, path
    ctl = tmp_control(deb)
    conffiles = open(os.path.join(ctl, "conffiles")).read().split()
    assert sorted(conffiles) == ["/etc/default/tapdiskd", "/etc/xen/scripts/block-tap"]
    postinst = open(os.path.join(ctl, "postinst")).read()
    assert "deb-systemd-helper" in postinst and "tapdiskd.service" in postinst
    # an upgrade must not stop or restart the server under running guests:
    # prerm stops it only on remove, postinst only starts it (a no-op if running)
    prerm = open(os.path.join(ctl, "prerm")).read()
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert stops and all('"$1" = remove' in prerm.split(line)[0].splitlines()[-1]
                         for line in stops), prerm
    assert "restart" not in postinst and "deb-systemd-invoke start" in postinst, postinst


def tmp_control(deb):
    d = os.path.join(os.path.dirname(deb), "control")
    run("rm", "-rf", d)
    run("dpkg-deb", "-e", deb, d)
    return d


def test_install_and_package_scripts_are_shellcheck_clean():
    run("shellcheck", "-S", "warning", *[os.path.join(ROOT, p) for p in (
        "scripts/install-deps", "scripts/build-deb", "scripts/run-demo", "scripts/check",
        "tests/fresh/check-fresh", "tests/ceph/start-ceph", "tests/ceph/stop-ceph")])


def test_a_build_without_rbd_refuses_rbd_params_in_one_line(tmp_path):
    """make RBD=0: the core builds and links without librbd, and an rbd:
    vbd is refused with one line saying so (the other drivers still open)."""
    build = str(tmp_path / "norbd")
    subprocess.run(["make", "-s", "-j2", "RBD=0", "BUILD=" + build, "bins"], cwd=ROOT,
                   check=True, capture_output=True, timeout=900)
    tapdiskd = os.path.join(build, "bin", "tapdiskd")
    libs = subprocess.run(["ldd", tapdiskd], capture_output=True, text=True).stdout
    assert "librbd" not in libs and "librados" not in libs, libs
    state = str(tmp_path / "state")
    srv = subprocess.Popen([tapdiskd, "--state-dir", state, "--foreground"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tapctl = [os.path.join(build, "bin", "tap-ctl"), "-S", state]
        for _ in range(200):
            if os.path.exists(os.path.join(state, "ctl.sock")):
                break
            subprocess.run(["sleep", "0.05"])
        r = subprocess.run(tapctl + ["create", "-a", "rbd:pool/img"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and "built without RBD" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = subprocess.run(tapctl + ["create", "-a", "ram:1M"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        srv.terminate()
        srv.wait(30)
