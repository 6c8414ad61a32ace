//! The serial-console shell against real shells on a real pseudo-terminal: a getty stand-in (a
//! shell script printing `login:` and `Password:`, then exec'ing an interactive bash), an autologin,
//! and a plain bash. Markers, echo, prompts and exit statuses as a guest's serial console has them;
//! booted guests are tested with the boot-image tests.

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use attest_driver::serial::{SerialShell, Step};
use attest_machine::{Console, Echo};

/// A getty stand-in: the password is "secret"; the shell it starts is an interactive bash.
const GETTY: &str = r#"
printf 'Debian GNU/Linux 12 testhost ttyS0\n\n'
# agetty asks again after an empty line.
while :; do printf 'testhost login: '; read user; [ -n "$user" ] && break; done
printf 'Password: '
stty -echo; read pass; stty echo; echo
if [ "$pass" = secret ]; then exec env -i TERM=dumb bash --norc --noprofile -i; fi
echo 'Login incorrect'
sleep 30
"#;

/// `script` on a fresh pty, with the pty's master as a console.
struct OnPty {
    console: Console,
    child: Child,
}

impl Drop for OnPty {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn on_pty(script: &str) -> OnPty {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave: OwnedFd = pty.slave;
    let mut command = Command::new("bash");
    command.args(["--norc", "--noprofile", "-c", script]);
    command.stdin(Stdio::from(slave.try_clone().unwrap()));
    command.stdout(Stdio::from(slave.try_clone().unwrap()));
    command.stderr(Stdio::from(slave));
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the hook only calls setsid and ioctl(TIOCSCTTY) on fd 0,
    // async-signal-safe system calls, and returns a bare errno.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    let console = Console::new(None, Echo::Off).unwrap();
    let master = std::fs::File::from(pty.master);
    console.attach(master.try_clone().unwrap());
    console.attach_input(master);
    OnPty { console, child }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

#[test]
fn login_with_a_password_then_exact_output_and_statuses() {
    let pty = on_pty(GETTY);
    let shell = SerialShell::new(pty.console.clone());
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    shell.login(user.trim(), Some("secret"), soon()).unwrap();

    assert_eq!(shell.execute("echo hello", soon()).unwrap(), (0, b"hello\n".to_vec()));
    assert_eq!(shell.execute("printf 'no newline'", soon()).unwrap(), (0, b"no newline".to_vec()));
    assert_eq!(shell.execute("true", soon()).unwrap(), (0, Vec::new()));
    assert_eq!(shell.execute("printf 'a\\n\\n'; exit 3", soon()).unwrap(), (3, b"a\n\n".to_vec()));
    let tricky = "printf '%s|' \"it's\" 'a \"b\"' $'x\\ny'";
    assert_eq!(shell.execute(tricky, soon()).unwrap().1, b"it's|a \"b\"|x\ny|");
    // Text that looks like a marker is just output.
    assert_eq!(shell.succeed("echo ATTEST-E0-1 0", soon()).unwrap(), "ATTEST-E0-1 0\n");
    assert_eq!(shell.execute("printf '\\001\\377\\r\\n'", soon()).unwrap().1, b"\x01\xff\r\n", "bytes as they are");
    // `exit` ends the command's subshell, not the serial shell.
    assert_eq!(shell.execute("exit 7", soon()).unwrap().0, 7);
    let long = shell.succeed("seq 1 20000", soon()).unwrap();
    assert_eq!(long.lines().count(), 20000);
    assert!(long.ends_with("19999\n20000\n"));
    let cd = shell.succeed("cd /tmp; pwd", soon()).unwrap();
    assert_eq!(cd, "/tmp\n");

    let asked = Instant::now();
    let err = shell.execute("sleep 30", Instant::now() + Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.step, Step::Shell);
    assert!(err.to_string().contains("`sleep 30` did not finish"), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(shell.succeed("echo after", soon()).unwrap(), "after\n", "^C left the shell usable");
}

#[test]
fn a_wrong_password_fails_the_login_step_in_time() {
    let pty = on_pty(GETTY);
    let shell = SerialShell::new(pty.console.clone());
    let err = shell.login("root", Some("wrong"), soon()).unwrap_err();
    assert_eq!(err.step, Step::Password);
    assert!(err.to_string().contains("Login incorrect"), "{err}");
    let pty = on_pty(GETTY);
    let err = SerialShell::new(pty.console.clone()).login("root", None, soon()).unwrap_err();
    assert!(err.to_string().contains("needs a password and the test gave none"), "{err}");
}

#[test]
fn an_autologin_is_accepted_for_its_user_only() {
    let autologin = "exec env -i TERM=dumb bash --norc --noprofile -i";
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let pty = on_pty(autologin);
    let shell = SerialShell::new(pty.console.clone());
    shell.login(user.trim(), None, soon()).unwrap();
    shell.login(user.trim(), None, soon()).unwrap();
    let asked = Instant::now();
    let other = shell.login("alice", None, soon()).unwrap_err().to_string();
    assert!(other.contains("is logged in on this console already"), "{other}");
    assert!(asked.elapsed() < Duration::from_secs(1), "refused at once, not at the deadline");
    let pty = on_pty(autologin);
    let err = SerialShell::new(pty.console.clone()).login("alice", None, soon()).unwrap_err();
    assert!(err.to_string().contains("expected a shell of alice"), "{err}");
}

#[test]
fn a_console_that_never_prompts_fails_within_the_deadline() {
    let pty = on_pty("sleep 30");
    let asked = Instant::now();
    let err = SerialShell::new(pty.console.clone()).login("root", None, Instant::now() + Duration::from_secs(1));
    let err = err.unwrap_err();
    assert_eq!(err.step, Step::Login);
    assert!(err.to_string().starts_with("login: expected a login prompt"), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(3));
}
