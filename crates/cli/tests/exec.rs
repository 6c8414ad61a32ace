//! `attest exec` end to end: every test boots a real VM (TCG when KVM is unusable) with the default guest.

mod common;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn exit_codes_pass_through() {
    for (script, expected) in [("exit 0", 0), ("exit 1", 1), ("exit 42", 42), ("kill -TERM $$", 128 + 15)] {
        let run = exec(&[], &["sh", "-c", script]);
        assert_eq!(run.code, expected, "{script}: {run:?}");
    }
}

#[test]
fn missing_program_is_127() {
    let run = exec(&[], &["attest-no-such-program"]);
    assert_eq!(run.code, 127, "{run:?}");
    assert!(run.stderr.contains("attest-no-such-program"), "{run:?}");
}

#[test]
fn stdout_and_stderr_stay_separate_and_ordered() {
    let run = exec(&[], &["sh", "-c", "for i in $(seq 1 2000); do echo out$i; echo err$i >&2; done"]);
    assert_eq!(run.code, 0, "{run:?}");
    let expected_out: String = (1..=2000).map(|i| format!("out{i}\n")).collect();
    let expected_err: String = (1..=2000).map(|i| format!("err{i}\n")).collect();
    assert_eq!(run.stdout_text(), expected_out);
    assert_eq!(run.stderr, expected_err);
}

#[test]
fn output_streams_while_the_program_runs() {
    let mut child = exec_command(&[], &["sh", "-c", "echo early; echo early-err >&2; sleep 4; echo late"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "early\n");
    line.clear();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(line, "early-err\n");
    let early_at = Instant::now();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "late\n");
    assert!(early_at.elapsed() >= Duration::from_secs(3), "early stdout or stderr arrived only at the end");
    assert!(child.wait().unwrap().success());
}

#[test]
fn ten_megabytes_of_binary_output_arrive_byte_exact() {
    // In the host's /tmp, which the guest sees through its private overlay.
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..10_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let file = dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    let run = exec(&[], &[OsString::from("cat"), file.into_os_string()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.len(), data.len());
    assert_eq!(sha256(&run.stdout), sha256(&data));
}

#[test]
fn stdin_reaches_the_program() {
    let mut child = exec_command(&[], &["cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert!(out.status.success());

    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut child = exec_command(&[], &["sha256sum"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || stdin.write_all(&data).unwrap())
    };
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}  -\n", sha256(&data)));
}

#[test]
fn no_stdin_gives_the_program_an_empty_stdin() {
    let mut child = exec_command(&["--no-stdin"], &["sh", "-c", "cat; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"not for the program\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "end\n");
}

#[test]
fn awkward_arguments_and_environment_arrive_byte_exact() {
    let awkward: Vec<OsString> = vec![
        "it's".into(),
        "a \"quoted\" word".into(),
        "new\nline".into(),
        "ünïcødé ✓".into(),
        "".into(),
        "$HOME `id` *".into(),
        OsString::from_vec(b"not utf8 \xff\xfe".to_vec()),
    ];
    let mut program: Vec<OsString> = vec!["sh".into(), "-c".into(), r#"printf '%s\0' "$@""#.into(), "sh".into()];
    program.extend(awkward.iter().cloned());
    let run = exec(&[], &program);
    assert_eq!(run.code, 0, "{run:?}");
    let expected: Vec<u8> = awkward.iter().flat_map(|a| a.clone().into_vec().into_iter().chain([0])).collect();
    assert_eq!(run.stdout, expected);

    let mut command = exec_command(
        &["--env", "ATTEST_T_OVERRIDE=from --env", "--env", "ATTEST_T_NEW=a b\n\"c\" 'd' $e"],
        &["sh", "-c", r#"printf '%s|%s|%s' "$ATTEST_T_INHERITED" "$ATTEST_T_OVERRIDE" "$ATTEST_T_NEW""#],
    );
    command.env("ATTEST_T_INHERITED", "inherited ✓").env("ATTEST_T_OVERRIDE", "from attest's env");
    let run = run_command(&mut command);
    assert_eq!(run.stdout_text(), "inherited ✓|from --env|a b\n\"c\" 'd' $e", "{run:?}");
}

/// One boot answers how the guest sees the host's files: it runs as root in the current directory,
/// whose writes reach the host; the rest of the host root is read-only; /run, /var/tmp and /tmp
/// are writable scratch, and /tmp shows the host's files while the guest's writes there stay private.
#[test]
fn the_guest_sees_the_host_root_read_only_its_cwd_read_write_and_a_private_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    let host_tmp = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(host_tmp.path().join("from-host"), "host data\n").unwrap();
    let script = format!(
        "pwd; echo written in the guest > out.txt; id -u; \
         touch /etc/attest-should-fail 2>/dev/null && echo wrote-etc; \
         touch /tmp/x /run/x /var/tmp/x && echo scratch-ok; \
         cat {0}/from-host && echo guest > {0}/from-guest && cat {0}/from-guest",
        host_tmp.path().display()
    );
    let run = run_command(exec_command(&[], &["sh", "-c", &script]).current_dir(&cwd));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout_text(), format!("{}\n0\nscratch-ok\nhost data\nguest\n", cwd.display()));
    assert_eq!(std::fs::read_to_string(cwd.join("out.txt")).unwrap(), "written in the guest\n");
    assert!(!std::path::Path::new("/etc/attest-should-fail").exists());
    assert!(!host_tmp.path().join("from-guest").exists(), "a write to the guest's /tmp reached the host");
}

#[test]
fn shares_honour_read_only_and_read_write() {
    let ro = tempfile::tempdir().unwrap();
    let rw = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("host-file"), "from the host\n").unwrap();
    let ro_arg = format!("{}:/tmp/ro-share:ro", ro.path().display());
    let rw_arg = format!("{}:/tmp/rw-share", rw.path().display());
    let script = "cat /tmp/ro-share/host-file; \
                  if touch /tmp/ro-share/new 2>/dev/null; then echo ro-writable; else echo ro-rejected; fi; \
                  echo guest > /tmp/rw-share/new && echo rw-ok";
    let run = exec(&["--share", &ro_arg, "--share", &rw_arg], &["sh", "-c", script]);
    assert_eq!(run.stdout_text(), "from the host\nro-rejected\nrw-ok\n", "{run:?}");
    assert!(!ro.path().join("new").exists());
    assert_eq!(std::fs::read_to_string(rw.path().join("new")).unwrap(), "guest\n");
}

#[test]
fn timeout_exits_124_promptly_with_the_console_tail() {
    let run = exec(&["--timeout", "6"], &["sleep", "600"]);
    assert_eq!(run.code, 124, "{run:?}");
    assert!(run.elapsed < Duration::from_secs(6 + 5), "{run:?}");
    assert!(run.stderr.contains("timed out: expected sleep to finish within 6s"), "{run:?}");
}

#[test]
fn guest_kernel_panic_is_125_with_the_console_tail() {
    let run = exec(&[], &["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("the guest kernel panicked"), "{run:?}");
    assert!(run.stderr.contains("lines of the guest console"), "{run:?}");
    assert!(run.stderr.contains("Kernel panic - not syncing: sysrq triggered crash"), "{run:?}");
    let tail: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("  | ")).collect();
    assert!(tail.len() >= 10 && tail.iter().all(|l| l.starts_with("  | [")), "kernel lines in the tail: {run:?}");
    assert!(run.elapsed < Duration::from_secs(30), "{run:?}");
}

#[test]
fn missing_or_corrupt_kernel_is_a_setup_error() {
    let run = exec(&["--kernel", "/nonexistent/vmlinuz"], &["true"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("/nonexistent/vmlinuz"), "{run:?}");

    let corrupt = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(corrupt.path(), vec![0x5a; 100_000]).unwrap();
    let run = exec(&["--kernel", corrupt.path().to_str().unwrap()], &["true"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("no x86 boot header"), "{run:?}");
}

#[test]
fn bad_usage_is_exit_2() {
    for options in
        [&["--memory", "lots"][..], &["--timeout", "-1"], &["--share", "/no/such/dir"], &["--env", "NOEQUALS"]]
    {
        let run = exec(options, &["true"]);
        assert_eq!(run.code, 2, "{options:?}: {run:?}");
    }
    let run = run_command(Command::new(attest_bin()).args(["exec", "true"]));
    assert_eq!(run.code, 2, "PROGRAM must follow --: {run:?}");
}

#[test]
fn stderr_is_exactly_the_programs_whether_the_accelerator_verdict_is_new_or_cached() {
    // A cache of its own, so the first run really makes the KVM verdict (and builds the initramfs).
    let cache = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cache_dir().join("kernels"), cache.path().join("kernels")).unwrap();
    for attempt in ["verdict made now", "verdict cached"] {
        let mut command = exec_command(&[], &["sh", "-c", "echo out; echo err >&2"]);
        let run = run_command(command.env("ATTEST_CACHE_DIR", cache.path()));
        assert_eq!(run.code, 0, "{attempt}: {run:?}");
        assert_eq!(run.stdout, b"out\n", "{attempt}: {run:?}");
        assert_eq!(run.stderr, "err\n", "{attempt}: {run:?}");
    }
    let failing = exec(&[], &["sh", "-c", "echo err >&2; exit 3"]);
    assert_eq!((failing.code, failing.stderr.as_str()), (3, "err\n"), "a program failing on its own: {failing:?}");
}

#[test]
fn verbose_reports_the_accelerator_and_the_timings() {
    let run = run_command(Command::new(attest_bin()).args(["-v", "exec", "--", "true"]).stdin(Stdio::null()));
    assert_eq!(run.code, 0, "{run:?}");
    let line = run.stderr.lines().find(|l| l.starts_with("attest: accel: ")).expect("an accel line");
    assert!(line.contains("KVM probe ran a guest") || line.contains("KVM is unusable"), "{line}");
    assert!(run.stderr.contains("attest: timings ms: setup="), "{run:?}");
    let run = run_command(Command::new(attest_bin()).args(["exec", "-v", "--accel", "tcg", "--", "true"]));
    assert!(run.stderr.contains("attest: accel: TCG (software emulation) (requested with --accel tcg)"), "{run:?}");
}

#[test]
fn strace_traces_the_program_on_stderr() {
    let run = exec(&["--strace"], &["true"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("execve(") && run.stderr.contains("exit_group(0)"), "{run:?}");
}

#[test]
fn four_parallel_runs_in_one_directory_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4)
        .map(|i| {
            exec_command(&[], &["sh", "-c", &format!("echo run{i} > run{i}.txt; echo run{i}")])
                .current_dir(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "run {i}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("run{i}\n"));
        assert_eq!(std::fs::read_to_string(dir.path().join(format!("run{i}.txt"))).unwrap(), format!("run{i}\n"));
    }
}

/// Starts `sleep` in a VM, waits until the program runs, and returns attest with its helpers and state dir.
fn started_run() -> (std::process::Child, Vec<u32>, std::path::PathBuf) {
    let mut child = exec_command(&["--timeout", "120"], &["sh", "-c", "echo running; exec sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "running\n");
    let helpers =
        children_of(child.id()).into_iter().filter(|p| !cmdline(*p).contains("attest-reaper")).collect::<Vec<_>>();
    let qemu = helpers.iter().map(|p| cmdline(*p)).find(|c| c.contains("qemu-system")).expect("a QEMU child");
    assert!(helpers.len() >= 2, "expected QEMU and virtiofsd children, got {helpers:?}");
    let state = state_dir_of(&qemu).expect("state dir in QEMU's command line");
    assert!(state.is_dir());
    (child, helpers, state)
}

fn assert_nothing_left(helpers: &[u32], state: &std::path::Path) {
    eventually("helpers to exit", Duration::from_secs(10), || helpers.iter().all(|p| !is_alive(*p)));
    eventually("the state directory to be removed", Duration::from_secs(10), || !state.exists());
}

#[test]
fn nothing_is_left_after_sigkill_of_attest() {
    let (mut child, helpers, state) = started_run();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_nothing_left(&helpers, &state);
}

#[test]
fn sigterm_and_sigint_clean_up_and_exit_128_plus_signal() {
    for (signal, code) in [(nix::sys::signal::SIGTERM, 143), (nix::sys::signal::SIGINT, 130)] {
        let (mut child, helpers, state) = started_run();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!(status.code(), Some(code), "{signal}: {stderr}");
        assert_nothing_left(&helpers, &state);
    }
}

#[test]
fn keep_state_keeps_the_console_log() {
    let run = exec(&["--keep-state"], &["sh", "-c", "echo marker-on-the-serial-console > /dev/console"]);
    assert_eq!(run.code, 0, "{run:?}");
    let line = run.stderr.lines().find_map(|l| l.strip_prefix("attest: state kept in ")).expect("kept path");
    let log = std::path::Path::new(line).join("console.log");
    let content = std::fs::read_to_string(&log).unwrap();
    assert!(content.contains("marker-on-the-serial-console"), "{}: {content}", log.display());
    std::fs::remove_dir_all(line).unwrap();
}

#[test]
fn a_closed_output_pipe_ends_the_program_with_sigpipe() {
    // `cat /dev/zero | attest exec -- yes | head -c 4`: endless stdin the program never reads
    // must not stop the closed stdout from reaching it.
    let mut child = exec_command(&["--timeout", "60"], &["yes"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || while stdin.write_all(&[0u8; 65536]).is_ok() {});
    let mut first = [0u8; 4];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"y\ny\n");
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 13), "yes | head must end yes with SIGPIPE");
}

#[test]
fn a_guest_that_does_not_boot_in_time_is_125() {
    let run = exec(&["--boot-timeout", "0.3"], &["true"]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(
        run.stderr.contains("the guest did not boot: expected the attest agent to report ready within 0.3s"),
        "{run:?}"
    );
    assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
}

#[test]
fn an_init_failure_is_125_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let share = format!("{}:/attest-no-such-dir/inside", dir.path().display());
    let run = exec(&["--share", &share], &["true"]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("the guest agent failed mounting the host's files"), "{run:?}");
    assert!(run.stderr.contains("/attest-no-such-dir/inside"), "{run:?}");
}

#[test]
fn console_shows_the_boot_live() {
    let run = exec(&["--console"], &["sh", "-c", "echo program-output"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("Linux version"), "{run:?}");
    assert_eq!(run.stdout_text(), "program-output\n");
}

/// Runs attest with its state under a private XDG_RUNTIME_DIR, then checks that neither a state
/// directory nor a process that used one outlived it.
fn assert_run_leaves_nothing(options: &[&str], program: &[&str], expected_code: i32) {
    let runtime = tempfile::tempdir().unwrap();
    let run = run_command(exec_command(options, program).env("XDG_RUNTIME_DIR", runtime.path()));
    assert_eq!(run.code, expected_code, "{run:?}");
    let state_base = runtime.path().join("attest");
    let leftovers: Vec<_> = std::fs::read_dir(&state_base).unwrap().flatten().map(|e| e.path()).collect();
    assert!(leftovers.is_empty(), "state left behind: {leftovers:?}");
    let marker = runtime.path().to_string_lossy().into_owned();
    let survivors: Vec<_> = live_pids().into_iter().filter(|pid| cmdline(*pid).contains(&marker)).collect();
    assert!(survivors.is_empty(), "processes left behind: {survivors:?}");
}

#[test]
fn nothing_is_left_after_success_failure_timeout_or_panic() {
    assert_run_leaves_nothing(&[], &["true"], 0);
    assert_run_leaves_nothing(&[], &["sh", "-c", "exit 3"], 3);
    assert_run_leaves_nothing(&["--timeout", "5"], &["sleep", "600"], 124);
    assert_run_leaves_nothing(&[], &["sh", "-c", "echo c > /proc/sysrq-trigger"], 125);
}

#[test]
fn the_agent_works_over_vsock_as_over_virtio_serial() {
    if attest_machine::vhost_vsock::find().is_none() {
        return eprintln!("SKIP: vhost-device-vsock not found (scripts/setup installs it)");
    }
    let mut command = exec_command(
        &["--channel", "vsock"],
        &["sh", "-c", "cat; echo err >&2; ls /dev/hvc0 /dev/vport* 2>/dev/null; exit 3"],
    );
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"in\x00put").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(out.stdout, b"in\x00put", "stdin and stdout byte-exact, and no virtio-serial device: {out:?}");
    assert_eq!(out.stderr, b"err\n", "{out:?}");
    assert_run_leaves_nothing(&["--channel", "vsock"], &["true"], 0);
}

#[test]
fn another_distro_kernel_with_9p_works() {
    let cache = cache_dir();
    let kernel = std::fs::read_dir(cache.join("test-kernels"))
        .expect("scripts/setup fetches Debian's generic kernel into the cache's test-kernels/")
        .flatten()
        .flat_map(|pkg| std::fs::read_dir(pkg.path().join("boot")).into_iter().flatten().flatten())
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .expect("a vmlinuz in test-kernels/*/boot");
    let dir = tempfile::tempdir().unwrap();
    let kernel_arg = kernel.to_str().unwrap();
    let run = run_command(
        exec_command(
            &["--kernel", kernel_arg, "--fs", "9p"],
            &["sh", "-c", "uname -r; grep -c ' 9p ' /proc/mounts; echo ok > f"],
        )
        .current_dir(dir.path()),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let release = kernel.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    assert_eq!(run.stdout_text(), format!("{release}\n2\n"), "{run:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("f")).unwrap(), "ok\n");
}

#[test]
fn a_background_process_holding_stdout_does_not_hang_the_run() {
    let run = exec(&[], &["sh", "-c", "sleep 600 & echo done"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout_text(), "done\n");
    assert!(run.stderr.contains("output still held open by a background process"), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(20), "{run:?}");
}

#[test]
fn a_file_sharing_daemon_that_dies_fails_the_run_with_its_reason() {
    let (mut child, helpers, state) = started_run();
    let virtiofsd = helpers.iter().copied().find(|p| cmdline(*p).contains("virtiofsd")).expect("a virtiofsd child");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(virtiofsd as i32), nix::sys::signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("virtiofsd for") && stderr.contains("killed by signal 9"), "{stderr}");
    assert_nothing_left(&helpers, &state);
}

#[test]
fn a_slow_reader_gets_all_output_and_the_real_exit_status() {
    // `attest exec -- cat blob | (sleep 7; cat)`: the program finishes while megabytes still wait
    // in the VM's queues; neither they nor the exit status may be lost.
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(40503) >> 7) as u8).collect();
    std::fs::write(dir.path().join("blob"), &data).unwrap();
    let mut child = exec_command(&["--timeout", "120"], &["sh", "-c", "cat blob; exit 7"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(7));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(7));
    assert_eq!(out.len(), data.len());
    assert_eq!(sha256(&out), sha256(&data));
}

#[test]
fn a_vm_qemu_refuses_is_reported_in_qemus_words_at_once() {
    let run = exec(&["--memory", "99999999M"], &["true"]);
    assert_eq!(run.code, 2, "{run:?}");
    // With shares, guest RAM is a memory backend: QEMU words it differently than for a plain -m.
    assert!(run.stderr.starts_with("attest: error: QEMU refused to start: qemu-system-x86_64: "), "{}", run.stderr);
    assert!(run.stderr.lines().next().unwrap().ends_with("Cannot allocate memory"), "{}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(5), "{:?}", run.elapsed);
}
