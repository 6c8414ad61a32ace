//! NixOS-style Python testScripts run by `attest run` and `attest driver` on real VMs (QEMU, TCG
//! here), with attest's minimal guest: the call forms nixpkgs tests use, two machines, failures
//! that point at the script's line, Ctrl-C, the global timeout, and the NixOS entry point.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{attest_bin, run_command, Run};

/// Why this host cannot run the scripts' VMs, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if attest_machine::Qemu::find_binary().is_none() {
        return Some("qemu-system-x86_64 not found".into());
    }
    if attest_image::kernel::locate(None, &common::cache_dir()).is_err() {
        return Some("no guest kernel (scripts/setup fetches one)".into());
    }
    if which::which("python3").is_err() {
        return Some("python3 not found".into());
    }
    attest_image::find_busybox().err().map(|e| e.to_string())
}

/// A test directory with `test.toml` (minimal-guest machines named `machines`) and `test.py`.
fn test_dir(machines: &[&str], extra: &str, script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!("script = \"test.py\"\n{extra}\n");
    for name in machines {
        toml.push_str(&format!("[machines.{name}]\nimage = \"minimal\"\nmemory = 256\n"));
    }
    std::fs::write(dir.path().join("test.toml"), toml).unwrap();
    std::fs::write(dir.path().join("test.py"), script).unwrap();
    dir
}

fn attest_run(dir: &Path, extra_args: &[&str]) -> Run {
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(dir.join("test.toml")).args(extra_args).stdin(Stdio::null());
    run_command(&mut command)
}

const NIXOS_STYLE: &str = r#"
start_all()

@polling_condition(seconds_interval=0.5)
def server_answers():
    "the server answers"
    server.succeed("true")

with subtest("commands on both machines"):
    t.assertIn("a\nb", server.succeed("echo a", "echo b"))
    client.succeed("echo hi > /tmp/x")
    t.assertEqual(client.succeed("cat /tmp/x"), "hi\n")
    status, output = server.execute("echo out; exit 3", timeout=10)
    assert (status, output) == (3, "out\n"), (status, output)
    assert server.execute("echo unbounded", timeout=None) == (0, "unbounded\n")
    client.fail("false")

with subtest("waits and retry"):
    server.succeed("(sleep 1; touch /tmp/later) >/dev/null 2>&1 &")
    server.wait_for_file("/tmp/later", timeout=30)
    retry(lambda last: server.execute("test -e /tmp/later")[0] == 0)
    server.succeed("echo from-the-script > /dev/ttyS0")
    server.wait_for_console_text("from-the-script", timeout=30)
    server.wait_until_fails("false", timeout=10)

with subtest("polling condition and screenshot"):
    with server_answers:
        client.succeed("true")
    server_answers.wait(timeout=30)
    server.screenshot("shot")
    machines[0].log("machines holds every machine")
"#;

#[test]
fn a_nixos_style_script_drives_two_machines() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let dir = test_dir(&["server", "client"], "", NIXOS_STYLE);
    let out = dir.path().join("out");
    let junit = dir.path().join("junit.xml");
    let run = attest_run(dir.path(), &["-o", out.to_str().unwrap(), "--junit-xml", junit.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(image::open(out.join("shot.png")).is_ok(), "a PNG screenshot in the output directory");
    assert!(out.join("server-console.log").is_file() && out.join("client-console.log").is_file());
    let xml = std::fs::read_to_string(junit).unwrap();
    for case in ["commands on both machines", "waits and retry", "polling condition and screenshot"] {
        assert!(xml.contains(&format!("<testcase name=\"{case}\"")), "{xml}");
    }
    assert!(xml.contains("failures=\"0\""), "{xml}");
}

const VLAN_SCRIPT: &str = r#"
import socket, urllib.request
start_all()
assert vlans == [vlan1] and vlan1.nr == 1 and vlan1.socket_dir.endswith("/vde1.ctl"), vlans
server.succeed("mkdir -p /srv && echo hello-over-vlan1 > /srv/index.html && httpd -p 80 -h /srv")
server.wait_for_open_port(80)
assert client.succeed("wget -q -O - http://server/") == "hello-over-vlan1\n"
client.block()
client.fail("timeout 3 wget -q -O - http://server/")
client.unblock()
client.succeed("timeout 10 wget -q -O - http://server/")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server.forward_port(host_port=port, guest_port=80)
assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read() == b"hello-over-vlan1\n"
"#;

#[test]
fn a_script_uses_vlans_block_and_forward_port() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    if which::which("vde_switch").is_err() {
        return eprintln!("SKIP: vde_switch not found (Debian's vde2)");
    }
    let dir = test_dir(&["server", "client"], "vlans = [1]", VLAN_SCRIPT);
    let run = attest_run(dir.path(), &[]);
    assert_eq!(run.code, 0, "{run:?}");
    // Without the switch program, the test stops before any machine boots, naming the fix.
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(dir.path().join("test.toml")).env("ATTEST_VDE_SWITCH", "/nonexistent/vde_switch");
    let missing = run_command(command.stdin(Stdio::null()));
    assert_ne!(missing.code, 0, "{missing:?}");
    assert!(
        missing.stderr.contains("vde_switch not found, needed for the test's VLANs: install Debian's vde2"),
        "{missing:?}"
    );
    assert!(!missing.stderr.contains("starting vm"), "{missing:?}");
}

#[test]
fn a_failing_assertion_points_at_the_script_line() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let script = "machine.succeed(\"true\")\n\nt.assertEqual(machine.succeed(\"echo 1\"), \"2\\n\")\n";
    let dir = test_dir(&["machine"], "", script);
    let run = attest_run(dir.path(), &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let script_path = dir.path().join("test.py");
    assert!(run.stderr.contains(&format!("File \"{}\", line 3, in <module>", script_path.display())), "{run:?}");
    assert!(run.stderr.contains("t.assertEqual(machine.succeed(\"echo 1\"), \"2\\n\")"), "{run:?}");
    assert!(run.stderr.contains("!!! RequestedAssertionFailed: '1\\n' != '2\\n'"), "{run:?}");

    // A failed command reports the machine, the command and its status.
    std::fs::write(&script_path, "machine.succeed(\"echo oops; exit 4\")\n").unwrap();
    let run = attest_run(dir.path(), &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("line 1, in <module>"), "{run:?}");
    assert!(
        run.stderr.contains("!!! RequestedAssertionFailed: machine: command `echo oops; exit 4` failed (exit code 4)"),
        "{run:?}"
    );
}

#[test]
fn bad_scripts_name_their_line_and_leave_nothing_running() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    for (script, line, message) in [
        ("start_all()\nif True\n", 2, "!!! SyntaxError"),
        ("machine.no_such_method()\n", 1, "!!! AttributeError: 'Machine' object has no attribute 'no_such_method'"),
        ("x = 1\nraise ValueError(f'boom {x}')\n", 2, "!!! ValueError: boom 1"),
    ] {
        let dir = test_dir(&["machine"], "", script);
        let run = attest_run(dir.path(), &[]);
        assert_eq!(run.code, 1, "{script}: {run:?}");
        assert!(run.stderr.contains(&format!("line {line}")), "{script}: {run:?}");
        assert!(run.stderr.contains(message), "{script}: {run:?}");
    }
    // A script that ends with its machines running: they are stopped, and that is no failure.
    let dir = test_dir(&["machine"], "", "start_all()\nmachine.succeed('true')\n");
    let run = attest_run(dir.path(), &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("must succeed: true"), "{run:?}");
}

#[test]
fn ctrl_c_in_the_middle_of_a_command_ends_the_script_at_its_line() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let dir = test_dir(&["interrupted"], "", "interrupted.succeed('true')\ninterrupted.succeed('sleep 60')\n");
    let mut child = Command::new(attest_bin())
        .arg("run")
        .arg(dir.path().join("test.toml"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let started = Instant::now();
    while !seen.contains("must succeed: sleep 60") {
        assert!(started.elapsed() < Duration::from_secs(120), "the command never started: {seen}");
        stderr.read_line(&mut seen).unwrap();
    }
    let interrupted = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGINT).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(interrupted.elapsed() < Duration::from_secs(20), "{:?}", interrupted.elapsed());
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("line 2, in <module>") && rest.contains("!!! KeyboardInterrupt"), "{rest}");
    let left: Vec<u32> =
        common::live_pids().into_iter().filter(|&p| common::cmdline(p).contains("-name interrupted")).collect();
    assert!(left.is_empty(), "no VM left: {left:?}");
}

#[test]
fn the_global_timeout_ends_a_hanging_script() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let dir = test_dir(&["machine"], "global_timeout = 20", "machine.succeed('true')\nmachine.succeed('sleep 600')\n");
    let run = attest_run(dir.path(), &[]);
    assert_eq!(run.code, 124, "{run:?}");
    assert!(run.elapsed < Duration::from_secs(60), "{run:?}");
    assert!(run.stderr.contains("global timeout"), "{run:?}");
}

#[test]
fn the_nixos_entry_point_runs_start_scripts_and_a_script_file() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    // A NixOS-like start script booting the minimal guest (see crates/driver/tests for the contract).
    let cache = common::cache_dir();
    let kernel = attest_image::kernel::locate(None, &cache).unwrap();
    let modules = kernel.module_tree().unwrap().resolve(&["virtio_pci", "virtio_console", "virtio_rng"]).unwrap().load;
    let initrd = attest_image::backdoor::backdoor_initramfs(
        &attest_image::find_busybox().unwrap(),
        &attest_image::backdoor::find_static_bash().unwrap(),
        &modules,
    )
    .unwrap()
    .write_cached(&cache.join("initramfs"))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start_script = dir.path().join("run-webserver-vm");
    std::fs::write(
        &start_script,
        format!(
            "#!/bin/sh\nexec qemu-system-x86_64 -machine q35,accel=tcg -cpu max -m 256 -nodefaults -kernel {} -initrd {} \
             -append \"console=ttyS0 panic=-1 quiet rdinit=/init\" $QEMU_OPTS \"$@\"\n",
            kernel.path.display(),
            initrd.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&start_script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = dir.path().join("test-script");
    std::fs::write(&script, "start_all()\nwebserver.succeed('echo up')\nmachine.succeed('true')\n").unwrap();

    // Flags, as the Nix wrapper passes them.
    let out = dir.path().join("out");
    let mut command = Command::new(attest_bin());
    command.arg("driver").arg("--start-scripts").arg(&start_script).arg("--global-timeout").arg("120");
    command.arg("-o").arg(&out).arg(&script).stdin(Stdio::null());
    let run = run_command(&mut command);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(out.join("webserver-console.log").is_file(), "{run:?}");

    // The environment fallbacks, and a machine the script creates itself.
    let created = format!(
        "extra = create_machine({:?}, name='extra')\nassert extra.succeed('echo made') == 'made\\n'\n\
         assert [m.name for m in machines] == ['webserver', 'extra'], machines\n",
        start_script.to_str().unwrap()
    );
    std::fs::write(&script, created).unwrap();
    let mut command = Command::new(attest_bin());
    command.arg("driver").env("startScripts", &start_script).env("testScript", &script).env("out", &out);
    let run = run_command(command.stdin(Stdio::null()));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(out.join("extra-console.log").is_file(), "{run:?}");
}

#[test]
fn the_shipped_example_passes() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    if which::which("debootstrap").is_err() {
        return eprintln!("SKIP: debootstrap not found (scripts/setup installs it and builds the Debian guest)");
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/web-server/test.toml");
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(&example).stdin(Stdio::null());
    let run = run_command(&mut command);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("(finished: subtest: it serves its page"), "{run:?}");
}

#[test]
fn check_finds_a_misspelt_method_and_a_wrong_argument_type_without_booting() {
    if which::which("mypy").is_err() {
        return eprintln!("SKIP: mypy not found (scripts/setup installs it)");
    }
    let script =
        "start_all()\nserver.succed('true')\nserver.wait_for_open_port('80')\nserver.succeed('a', 'b', timeout=10)\n";
    let dir = test_dir(&["server"], "", script);
    let run = attest_run(dir.path(), &["--check"]);
    assert_eq!(run.code, 1, "{run:?}");
    let script_path = dir.path().join("test.py");
    let at = |line: u32| format!("{}:{line}:", script_path.display());
    assert!(run.stderr.contains(&at(2)) && run.stderr.contains("\"Machine\" has no attribute \"succed\""), "{run:?}");
    assert!(
        run.stderr.contains(&at(3)) && run.stderr.contains("incompatible type \"str\"; expected \"int\""),
        "{run:?}"
    );
    assert!(!run.stderr.contains(&at(4)), "the NixOS call forms check clean: {run:?}");
    assert!(run.elapsed < Duration::from_secs(30), "nothing booted: {run:?}");

    std::fs::write(&script_path, NIXOS_STYLE.replace("client.", "server.")).unwrap();
    let run = attest_run(dir.path(), &["--check"]);
    assert_eq!(run.code, 0, "the NixOS-style script checks clean: {run:?}");
}

#[test]
fn interactive_mode_is_a_repl_with_the_scripts_globals() {
    use expectrl::{Eof, Expect, Session};
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let dir = test_dir(&["machine"], "", "machine.succeed('echo from-the-script > /tmp/ran')\n");
    let mut command = Command::new(attest_bin());
    command.arg("run").arg("-I").arg(dir.path().join("test.toml")).current_dir(dir.path());
    let mut session = Session::spawn(command).expect("spawning attest on a pty");
    session.set_expect_timeout(Some(Duration::from_secs(90)));
    session.expect(">>> ").expect("a Python prompt");
    session.send_line("machine.succeed('echo $((6 * 7))')").unwrap();
    session.expect("'42\\n'").expect("a machine call's result");
    session.send_line("test_script(); machine.succeed('cat /tmp/ran')").unwrap();
    session.expect("'from-the-script\\n'").expect("test_script() runs the script");
    session.send_line("exit()").unwrap();
    session.expect(Eof).expect("attest ends with the REPL");
    let history = std::fs::read_to_string(dir.path().join(".nixos-test-history")).unwrap_or_default();
    assert!(history.contains("machine.succeed('echo $((6 * 7))')"), "history is kept: {history:?}");
}

#[test]
fn stubs_for_editors_declare_the_api_and_the_scripts_globals() {
    if which::which("stubgen").is_err() {
        return eprintln!("SKIP: stubgen not found (Debian's mypy has it; scripts/setup installs it)");
    }
    let dir = test_dir(&["server", "web-client"], "", "start_all()\n");
    let stubs = dir.path().join("stubs");
    let run = attest_run(dir.path(), &["--stubs", stubs.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let api = std::fs::read_to_string(stubs.join("attest_driver.pyi")).unwrap();
    assert!(
        api.contains("def wait_for_unit(self, unit: str, user: Optional[str] = ..., timeout: int = ...) -> None"),
        "{api}"
    );
    assert!(api.contains("def succeed(self, *commands: str, timeout: Optional[int] = ...) -> str"), "{api}");
    let globals = std::fs::read_to_string(stubs.join("__builtins__.pyi")).unwrap();
    assert!(globals.contains("server: Machine\n") && globals.contains("web_client: Machine\n"), "{globals}");
    assert!(!globals.contains("\nmachine: Machine"), "`machine` only for a single machine: {globals}");
}

/// A test whose minimal-guest machine is cached at its first shell. Its files live in the guest's
/// memory (the guest has no disk), so runs at once test that each clone's memory is its own.
fn cached_test_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let toml = "script = \"test.py\"\n[machines.server]\nimage = \"minimal\"\nmemory = 256\nready = \"shell\"\n";
    std::fs::write(dir.path().join("test.toml"), toml).unwrap();
    // Each run writes its own file and must see no other run's, while both run at once.
    let script = r#"
import os, time
token = os.environ["TOKEN"]
server.succeed(f"mkdir -p /tmp/runs && test -z \"$(ls /tmp/runs)\" && echo {token} > /tmp/runs/{token}")
time.sleep(2)
t.assertEqual(server.succeed("ls /tmp/runs"), f"{token}\n")
"#;
    std::fs::write(dir.path().join("test.py"), script).unwrap();
    dir
}

fn cached_run(dir: &Path, cache: &Path, token: &str) -> Command {
    let mut command = Command::new(attest_bin());
    command.arg("run").arg(dir.join("test.toml")).env("ATTEST_SNAPSHOT_CACHE", cache).env("TOKEN", token);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

#[test]
fn two_runs_restore_one_cached_machine_at_once_and_each_sees_only_its_own_writes() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let (dir, cache) = (cached_test_dir(), tempfile::tempdir().unwrap());
    let first = run_command(&mut cached_run(dir.path(), cache.path(), "first"));
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(first.stderr.contains("to be cached once ready"), "{}", first.stderr);
    let runs: Vec<_> =
        ["left", "right"].iter().map(|token| cached_run(dir.path(), cache.path(), token).spawn().unwrap()).collect();
    for run in runs {
        let output = run.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert!(stderr.contains("restored the ready machine"), "{stderr}");
    }

    // The cache as `attest cache` shows and clears it.
    let cache_command = |args: &[&str]| {
        let mut command = Command::new(attest_bin());
        command.arg("cache").args(args).env("ATTEST_SNAPSHOT_CACHE", cache.path());
        run_command(&mut command)
    };
    let listed = cache_command(&["list"]);
    let lines: Vec<String> = listed.stdout_text().lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(fields[0], "server", "{lines:?}");
    assert!(lines[0].contains(" MiB ") && lines[0].contains(" s ago ") && lines[0].ends_with(fields[1]), "{lines:?}");
    let cleared = cache_command(&["clear"]);
    assert!(cleared.stdout_text().starts_with("removed 1 cached machine(s)"), "{}", cleared.stdout_text());
    assert!(cache_command(&["list"]).stdout_text().starts_with("no cached machines"));
}

/// A run killed while it builds the cached machine leaves nothing the next run would use: that
/// one builds the entry anew, and it is whole.
#[test]
fn a_run_killed_while_caching_leaves_nothing_to_use() {
    if let Some(why) = missing_prerequisite() {
        return eprintln!("SKIP: {why}");
    }
    let (dir, cache) = (cached_test_dir(), tempfile::tempdir().unwrap());
    let mut child = cached_run(dir.path(), cache.path(), "killed").spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let started = Instant::now();
    while !seen.contains("to be cached once ready") {
        assert!(started.elapsed() < Duration::from_secs(120), "the build never started: {seen}");
        assert!(stderr.read_line(&mut seen).unwrap() > 0, "attest ended: {seen}");
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let complete: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.path().extension().is_none())
        .collect();
    assert!(complete.is_empty(), "no complete entry after the kill: {complete:?}");

    let next = run_command(&mut cached_run(dir.path(), cache.path(), "next"));
    assert_eq!(next.code, 0, "{}", next.stderr);
    assert!(next.stderr.contains("to be cached once ready"), "built anew: {}", next.stderr);
    let names: Vec<String> =
        std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".partial")), "the killed build's files are gone: {names:?}");
}
