//! One `attest exec` run: boot the VM, hand the agent the program, stream its output, and turn what
//! happened (program exit, timeout, guest failure, a signal to attest) into attest's exit status.
//!
//! Everything that can happen arrives as an [`Event`] on one channel, so the main thread waits on a
//! single `recv_timeout` with the run's deadline, and tears down in one place.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attest_machine::console::Echo;
use attest_machine::{MachineEventSink, StateDir, Vm};
use attest_protocol::{Frame, HostMessage};
use attest_session::reader::{self, OutputSink};
use attest_session::{Deadlines, Event, Outcome, SessionState, Step, Timings};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};

use super::guest::PreparedGuest;
use super::stdio::{forward_stdin, RawOut};
use super::terminal::{self, RawMode, SharedScreenModes};
use super::ExecArgs;
use crate::exit_code;

/// How long the console may take to hand over the dead VMM's last output.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);
const CONSOLE_TAIL: usize = 40;

/// The host terminal while a program runs on a guest terminal.
#[derive(Default)]
struct HostTerminal {
    raw: Option<RawMode>,
    screen: SharedScreenModes,
}

impl HostTerminal {
    /// Puts the terminal back as it was, and switches off the screen modes the program left on.
    /// Only for endings the program did not choose: a program that exits restores its own modes.
    fn restore_after_interruption(&mut self) {
        if self.raw.take().is_some() {
            self.screen.lock().unwrap_or_else(|p| p.into_inner()).restore();
        }
    }
}

pub fn run(guest: PreparedGuest, args: &ExecArgs, verbose: bool, t0: Instant) -> i32 {
    tracing::debug!(kernel = %guest.kernel, "guest");
    let state = match StateDir::create(args.keep_state) {
        Ok(state) => state,
        Err(err) => return exit_code::setup_error(&format!("creating the state directory: {err}")),
    };
    let (tx, rx) = mpsc::channel();
    let mut host_terminal = guest.start.terminal.map(|_| HostTerminal::default());
    if let Err(err) = forward_signals(tx.clone(), host_terminal.is_some()) {
        return exit_code::setup_error(&format!("installing signal handlers: {err}"));
    }

    let vm_events: MachineEventSink = {
        let tx = tx.clone();
        Arc::new(move |happened| drop(tx.send(Event::Vm(happened.event))))
    };
    let machine_dir = match state.machine_dir(0, &guest.spec.name) {
        Ok(dir) => dir,
        Err(err) => return exit_code::setup_error(&format!("creating the machine's state directory: {err}")),
    };
    let vmm_started = Instant::now();
    let mut vm = match Vm::start(
        &guest.qemu,
        &guest.spec,
        &machine_dir,
        if args.console { Echo::Raw } else { Echo::Off },
        vm_events,
    ) {
        Ok(vm) => vm,
        Err(err) => return exit_code::setup_error(&format!("starting the VM: {err:#}")),
    };
    let deadline = args.timeout.map(|secs| t0 + Duration::from_secs_f64(secs));
    let boot_deadline = Instant::now() + Duration::from_secs_f64(args.boot_timeout);
    if let Some(transport) = vm.take_agent() {
        let screen = host_terminal.as_ref().map(|t| t.screen.clone());
        reader::spawn(transport, boot_deadline, tx, stdout_sink(screen), stderr_sink());
    }

    let deadlines = Deadlines { run: deadline, boot: boot_deadline, boot_secs: args.boot_timeout };
    let mut session = SessionState::new(deadlines, vmm_started);
    let outcome = drive(&rx, &guest, &mut session, !args.no_stdin, &mut host_terminal);
    let timings = session.timings;
    // Before the kill, which would make any exit look deliberate.
    let refused = match outcome {
        Outcome::GuestFailed(_) if timings.ready.is_none() => vm.refusal(),
        _ => None,
    };
    vm.kill();
    if let Some(host_terminal) = &mut host_terminal {
        if !matches!(outcome, Outcome::Program(_)) {
            host_terminal.restore_after_interruption();
        }
    }
    // Normal mode again before anything else is printed.
    drop(host_terminal);
    // QEMU is gone, so its console pipes end; read them out before taking the tail.
    let console = vm.console().clone();
    console.wait_closed(CONSOLE_DRAIN);
    let (console_tail, kernel_panic) = (console.tail(CONSOLE_TAIL), console.kernel_panic());
    drop(vm);
    let state_path = machine_dir.path().to_path_buf();
    let kept = state.keep();
    drop(state);

    if args.timings || verbose {
        print_timings(&timings, t0);
    }
    if kept {
        say!("attest: state kept in {}", state_path.display());
    }
    if let Some(refused) = refused {
        return exit_code::setup_error(&refused);
    }
    report(outcome, args, kernel_panic, &console_tail, (&state_path, kept))
}

/// Turns the signals attest handles into events; SIGWINCH only when the program has a terminal.
fn forward_signals(tx: Sender<Event>, terminal: bool) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    if terminal {
        signals.add_signal(SIGWINCH)?;
    }
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if tx.send(Event::Signal(signal)).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Connects to the agent and reads its frames: output goes straight to attest's stdout and stderr,
/// in order, and control messages become events.
/// attest's stdout; with a terminal the output also passes through `screen`, to see which modes
/// it switches.
fn stdout_sink(screen: Option<SharedScreenModes>) -> OutputSink {
    let mut stdout = RawOut::stdout();
    Box::new(move |data| {
        if let Some(screen) = &screen {
            screen.lock().unwrap_or_else(|p| p.into_inner()).observe(data);
        }
        stdout.write(data)
    })
}

fn stderr_sink() -> OutputSink {
    let mut stderr = RawOut::stderr();
    Box::new(move |data| stderr.write(data))
}

/// The session's event loop: one channel, one `recv_timeout` until the session's next deadline.
/// The session decides what events mean; this loop adds what only the CLI does: sending the start
/// request and stdin, the raw terminal, and forwarding resizes.
fn drive(
    rx: &Receiver<Event>,
    guest: &PreparedGuest,
    session: &mut SessionState,
    forward_stdin_enabled: bool,
    host_terminal: &mut Option<HostTerminal>,
) -> Outcome {
    // Kept once the program runs, for messages beside its stdin (terminal resizes).
    let mut control = None;
    loop {
        let now = Instant::now();
        let step = match rx.recv_timeout(session.wake_at(now).saturating_duration_since(now)) {
            Ok(Event::Signal(SIGWINCH)) => {
                if let Some(channel) = &control {
                    send_resize(channel);
                }
                continue;
            }
            Ok(event) => session.on_event(event, Instant::now()),
            Err(RecvTimeoutError::Timeout) => session.on_wake(Instant::now()),
            Err(RecvTimeoutError::Disconnected) => Step::Done(Outcome::GuestFailed("all event sources ended".into())),
        };
        match step {
            Step::Wait => {}
            Step::Done(outcome) => return outcome,
            Step::Ready(channel) => {
                control = Some(channel.clone());
                // Raw from here: until the program runs, ^C interrupts attest itself.
                if let Some(host_terminal) = host_terminal {
                    match RawMode::enter() {
                        Ok(raw) => host_terminal.raw = Some(raw),
                        Err(err) => tracing::warn!("cannot put the terminal in raw mode: {err}"),
                    }
                }
                let start = Frame::Host(HostMessage::Start(guest.start.clone()));
                forward_stdin(channel, start, forward_stdin_enabled);
            }
        }
    }
}

/// Tells the guest the terminal's new size, from a thread of its own, like every write to the
/// guest: a stalled guest must not hold the loop.
fn send_resize(channel: &attest_session::AgentWriter) {
    let resize = Frame::Host(HostMessage::Resize(terminal::window_size()));
    let channel = channel.clone();
    std::thread::spawn(move || channel.send(&resize));
}

fn report(
    outcome: Outcome,
    args: &ExecArgs,
    kernel_panic: Option<String>,
    console: &[String],
    (state, kept): (&std::path::Path, bool),
) -> i32 {
    let program = args.command.first().map(|p| p.to_string_lossy().into_owned()).unwrap_or("the shell".into());
    let (code, message) = match outcome {
        Outcome::Program(status) => return exit_code::of_program(status),
        Outcome::Interrupted(signal) => return 128 + signal,
        Outcome::TimedOut => (
            exit_code::TIMEOUT,
            format!("timed out: expected {program} to finish within {}s", args.timeout.unwrap_or_default()),
        ),
        Outcome::GuestFailed(why) => {
            let message = match kernel_panic {
                Some(line) => format!("the guest kernel panicked while running {program}: {line}"),
                None => format!("the guest failed while running {program}: {why}"),
            };
            (exit_code::GUEST_FAILURE, message)
        }
    };
    say!("attest: error: {message}");
    let log = if kept { format!(" ({})", state.join("console.log").display()) } else { String::new() };
    if console.is_empty() {
        say!("attest: the guest console printed nothing{log}");
    } else {
        say!("attest: last {} lines of the guest console{log}:", console.len());
    }
    for line in console {
        say!("  | {line}");
    }
    code
}

fn print_timings(t: &Timings, t0: Instant) {
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => format!("{}", b.saturating_duration_since(a).as_millis()),
        _ => "-".into(),
    };
    say!(
        "attest: timings ms: setup={} vmm_to_ready={} (guest kernel={} modules={} port={}) start={} program={} total={}",
        ms(Some(t0), t.vmm_started),
        ms(t.vmm_started, t.ready),
        t.kernel_ms,
        t.modules_ms.saturating_sub(t.kernel_ms),
        t.ready_ms.saturating_sub(t.modules_ms),
        ms(t.ready, t.started),
        ms(t.started, t.exited),
        t0.elapsed().as_millis()
    );
}
