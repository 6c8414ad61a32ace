//! One `attest exec` run: boot the VM, hand the agent the program, stream its output, and turn what
//! happened (program exit, timeout, guest failure, a signal to attest) into attest's exit status.
//!
//! Everything that can happen arrives as an [`Event`] on one channel, so the main thread waits on a
//! single `recv_timeout` with the run's deadline, and tears down in one place.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attest_machine::{EventSink, StateDir, Vm, VmEvent};
use attest_protocol::{ExitStatus, Frame, GuestMessage, HostMessage};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};

use super::guest::{describe_kernel, PreparedGuest};
use super::stdio::{forward_stdin, AgentWriter, RawOut};
use super::terminal::{self, RawMode, SharedScreenModes};
use super::ExecArgs;
use crate::exit_code;

/// After the agent channel ends or the VMM exits, how long to wait for the other sign (and for
/// the agent's last frames) before reporting what is known.
const DEATH_GRACE: Duration = Duration::from_secs(5);
/// How long the console may take to hand over the dead VMM's last output.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);
const CONSOLE_TAIL: usize = 40;

enum Event {
    AgentConnected(AgentWriter),
    Agent(GuestMessage),
    AgentClosed(String),
    Vm(VmEvent),
    Signal(i32),
}

enum Outcome {
    Program(ExitStatus),
    TimedOut,
    GuestFailed(String),
    Interrupted(i32),
}

#[derive(Default)]
struct Timings {
    vmm_started: Option<Instant>,
    ready: Option<Instant>,
    started: Option<Instant>,
    exited: Option<Instant>,
    kernel_ms: u64,
    modules_ms: u64,
    ready_ms: u64,
}

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
    tracing::debug!(kernel = %describe_kernel(&guest.kernel), "guest");
    let state = match StateDir::create(args.keep_state) {
        Ok(state) => state,
        Err(err) => return exit_code::setup_error(&format!("creating the state directory: {err}")),
    };
    let (tx, rx) = mpsc::channel();
    let mut host_terminal = guest.start.terminal.map(|_| HostTerminal::default());
    if let Err(err) = forward_signals(tx.clone(), host_terminal.is_some()) {
        return exit_code::setup_error(&format!("installing signal handlers: {err}"));
    }

    let vm_events: EventSink = {
        let tx = tx.clone();
        Arc::new(move |event| drop(tx.send(Event::Vm(event))))
    };
    let mut timings = Timings { vmm_started: Some(Instant::now()), ..Timings::default() };
    let mut vm = match Vm::start(&guest.qemu, &guest.spec, &state, args.console, vm_events) {
        Ok(vm) => vm,
        Err(err) => return exit_code::setup_error(&format!("starting the VM: {err:#}")),
    };
    let deadline = args.timeout.map(|secs| t0 + Duration::from_secs_f64(secs));
    let boot_deadline = Instant::now() + Duration::from_secs_f64(args.boot_timeout);
    if let Some(transport) = vm.take_agent() {
        let screen = host_terminal.as_ref().map(|t| t.screen.clone());
        spawn_agent_reader(transport, boot_deadline, tx, screen);
    }

    let deadlines = Deadlines { run: deadline, boot: boot_deadline, boot_secs: args.boot_timeout };
    let outcome = drive(&rx, &guest, deadlines, !args.no_stdin, &mut host_terminal, &mut timings);
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
    let state_path = state.path().to_path_buf();
    let kept = state.keep();
    drop(state);

    if args.timings || verbose {
        print_timings(&timings, t0);
    }
    if kept {
        say!("attest: state kept in {}", state_path.display());
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
/// With a terminal, the output also passes through `screen` to see which modes it switches.
fn spawn_agent_reader(
    mut transport: Box<dyn attest_machine::Transport>,
    deadline: Instant,
    tx: Sender<Event>,
    screen: Option<SharedScreenModes>,
) {
    std::thread::spawn(move || {
        let mut stream = match transport.connect(deadline) {
            Ok(stream) => stream,
            Err(err) => {
                tx.send(Event::AgentClosed(format!("{}: {err}", transport.describe()))).ok();
                return;
            }
        };
        let writer = match stream.try_clone() {
            Ok(writer) => AgentWriter::new(writer),
            Err(err) => return drop(tx.send(Event::AgentClosed(err.to_string()))),
        };
        tx.send(Event::AgentConnected(writer.clone())).ok();
        let (mut stdout, mut stderr) = (RawOut::stdout(), RawOut::stderr());
        let why = loop {
            // When attest's own reader goes away, the program's stream is closed the same way.
            let reader_gone = match Frame::read_from(&mut stream) {
                Ok(Some(Frame::Stdout(data))) => {
                    if let Some(screen) = &screen {
                        screen.lock().unwrap_or_else(|p| p.into_inner()).observe(&data);
                    }
                    stdout.write(&data).then_some(Frame::StdoutClosed)
                }
                Ok(Some(Frame::Stderr(data))) => stderr.write(&data).then_some(Frame::StderrClosed),
                Ok(Some(Frame::StdinCredit(bytes))) => {
                    writer.grant_stdin(bytes);
                    None
                }
                Ok(Some(Frame::Guest(message))) => {
                    let done = matches!(message, GuestMessage::Exited { .. } | GuestMessage::Failed { .. });
                    tx.send(Event::Agent(message)).ok();
                    if done {
                        return;
                    }
                    None
                }
                Ok(Some(other)) => break format!("unexpected frame from the guest: {other:?}"),
                Ok(None) => break "the guest closed the agent channel".to_string(),
                Err(err) => break format!("reading from the guest agent: {err}"),
            };
            if let Some(frame) = reader_gone {
                writer.send(&frame).ok();
            }
        };
        tx.send(Event::AgentClosed(why)).ok();
    });
}

/// The run's own deadline (`--timeout`, from attest's start) and the boot's (`--boot-timeout`).
struct Deadlines {
    run: Option<Instant>,
    boot: Instant,
    boot_secs: f64,
}

fn drive(
    rx: &Receiver<Event>,
    guest: &PreparedGuest,
    Deadlines { run: deadline, boot: boot_deadline, boot_secs }: Deadlines,
    forward_stdin_enabled: bool,
    host_terminal: &mut Option<HostTerminal>,
    timings: &mut Timings,
) -> Outcome {
    let mut writer: Option<AgentWriter> = None;
    // Kept once the program runs, for messages beside its stdin (terminal resizes).
    let mut control: Option<AgentWriter> = None;
    // A dying guest shows several signs: the agent channel ends, the VMM exits, its helpers exit.
    // They come in any order. Once the VMM is gone the channel is certain to reach its end, and the
    // agent's last frames (its exit report included) may still be in flight, so that end is awaited
    // however long the reader takes to write them out; other signs wait a few seconds for the rest.
    let mut signs = DeathSigns::default();
    let mut agent_connected = false;
    let mut grace: Option<Instant> = None;
    loop {
        if signs.complete() || grace.is_some_and(|g| Instant::now() >= g) {
            return Outcome::GuestFailed(signs.explain());
        }
        let booted = timings.ready.is_some();
        let mut wait_until = match (booted, deadline) {
            (false, Some(d)) => d.min(boot_deadline),
            (false, None) => boot_deadline,
            (true, Some(d)) => d,
            (true, None) => Instant::now() + Duration::from_secs(3600),
        };
        if let Some(grace) = grace {
            wait_until = wait_until.min(grace);
        }
        let event = match rx.recv_timeout(wait_until.saturating_duration_since(Instant::now())) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Outcome::TimedOut
            }
            Err(RecvTimeoutError::Timeout) if !booted && grace.is_none() && Instant::now() >= boot_deadline => {
                return Outcome::GuestFailed(format!(
                    "the guest did not boot: expected the attest agent to report ready within {boot_secs}s \
                     (--boot-timeout), but it never did"
                ));
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Outcome::GuestFailed("all event sources ended".into()),
        };
        match event {
            Event::AgentConnected(stream) => {
                agent_connected = true;
                writer = Some(stream);
            }
            Event::Agent(GuestMessage::Ready { kernel_ms, modules_ms, ready_ms }) => {
                timings.ready = Some(Instant::now());
                (timings.kernel_ms, timings.modules_ms, timings.ready_ms) = (kernel_ms, modules_ms, ready_ms);
                let Some(channel) = writer.take() else {
                    return Outcome::GuestFailed("the agent reported ready on a channel attest never saw".into());
                };
                control = Some(channel.clone());
                // Raw from here: until the program runs, ^C interrupts attest itself.
                if let Some(host_terminal) = host_terminal {
                    match RawMode::enter() {
                        Ok(raw) => host_terminal.raw = Some(raw),
                        Err(err) => tracing::warn!("cannot put the terminal in raw mode: {err}"),
                    }
                }
                // Sent from the stdin thread: a stalled guest must not block this loop and its deadlines.
                let start = Frame::Host(HostMessage::Start(guest.start.clone()));
                forward_stdin(channel, start, forward_stdin_enabled);
            }
            Event::Agent(GuestMessage::Started { .. }) => timings.started = Some(Instant::now()),
            Event::Agent(GuestMessage::Exited { status, .. }) => {
                timings.exited = Some(Instant::now());
                return Outcome::Program(status);
            }
            Event::Agent(GuestMessage::Failed { stage, message }) => {
                return Outcome::GuestFailed(format!("the guest agent failed {stage}: {message}"));
            }
            Event::AgentClosed(why) => {
                signs.agent_lost = Some(why);
                grace.get_or_insert(Instant::now() + DEATH_GRACE);
            }
            Event::Vm(VmEvent::VmmExited(status)) => {
                signs.vm_exit = Some(status);
                if !agent_connected {
                    grace.get_or_insert(Instant::now() + DEATH_GRACE);
                }
            }
            Event::Vm(VmEvent::HelperFailed(why)) => {
                signs.helper_first |= signs.vm_exit.is_none();
                signs.helper_failed.get_or_insert(why);
                grace.get_or_insert(Instant::now() + DEATH_GRACE);
            }
            Event::Signal(SIGWINCH) => {
                if let Some(channel) = &control {
                    let resize = Frame::Host(HostMessage::Resize(terminal::window_size()));
                    let channel = channel.clone();
                    // Off the loop, like every write to the guest: a stalled guest must not hold it.
                    std::thread::spawn(move || channel.send(&resize));
                }
            }
            Event::Signal(signal) => return Outcome::Interrupted(signal),
        }
    }
}

/// What has been seen of a guest that is going away.
#[derive(Default)]
struct DeathSigns {
    agent_lost: Option<String>,
    vm_exit: Option<ExitStatus>,
    helper_failed: Option<String>,
    /// The helper died while the VMM still ran: then it is the likelier cause.
    helper_first: bool,
}

impl DeathSigns {
    fn complete(&self) -> bool {
        self.agent_lost.is_some() && self.vm_exit.is_some()
    }

    /// A helper dying under a live VMM explains what follows; otherwise the VMM's exit explains the
    /// rest (helpers end with it).
    fn explain(self) -> String {
        let vm_part = |why: Option<String>, status: ExitStatus| match why {
            Some(why) => format!("{why}; the VM exited ({status})"),
            None => format!("the VM exited ({status}) before the program finished"),
        };
        match (self.vm_exit, self.agent_lost, self.helper_failed) {
            (Some(status), why, Some(helper)) if self.helper_first => {
                format!("{helper}; then {}", vm_part(why, status))
            }
            (Some(status), why, _) => vm_part(why, status),
            (None, _, Some(helper)) => helper,
            (None, Some(why), None) => why,
            (None, None, None) => "the guest stopped answering".into(),
        }
    }
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
