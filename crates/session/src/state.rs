//! The decisions of one agent session's event loop, apart from the loop itself so they can be
//! tested with made-up event orders: what each event means, the deadlines, and how a dying guest's
//! several signs (channel end, VMM exit, helper exit), which arrive in any order, become one verdict.

use std::time::{Duration, Instant};

use attest_machine::VmEvent;
use attest_protocol::{ExitStatus, GuestMessage};

use crate::AgentWriter;

/// After the agent channel ends or the VMM exits, how long to wait for the other sign (and for
/// the agent's last frames) before reporting what is known.
pub const DEATH_GRACE: Duration = Duration::from_secs(5);

/// Everything a session hears, on one channel.
pub enum Event {
    AgentConnected(AgentWriter),
    Agent(GuestMessage),
    AgentClosed(String),
    Vm(VmEvent),
    /// A signal asking the host to stop (the caller handles the ones that do not, like SIGWINCH).
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Program(ExitStatus),
    TimedOut,
    GuestFailed(String),
    Interrupted(i32),
}

/// The run's own deadline (e.g. `--timeout`, counted from the caller's start) and the boot's.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub run: Option<Instant>,
    pub boot: Instant,
    /// The boot timeout as the user gave it, for the message.
    pub boot_secs: f64,
}

/// When each phase ended: host instants, and the guest's uptime (ms) at its own milestones.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub vmm_started: Option<Instant>,
    pub ready: Option<Instant>,
    pub started: Option<Instant>,
    pub exited: Option<Instant>,
    pub kernel_ms: u64,
    pub modules_ms: u64,
    pub ready_ms: u64,
}

/// What the caller should do next.
pub enum Step {
    Wait,
    /// The agent is ready: send it the start request on this channel, off the loop (a stalled guest
    /// must not hold the loop and its deadlines).
    Ready(AgentWriter),
    Done(Outcome),
}

pub struct SessionState {
    deadlines: Deadlines,
    writer: Option<AgentWriter>,
    agent_connected: bool,
    signs: DeathSigns,
    grace: Option<Instant>,
    pub timings: Timings,
}

impl SessionState {
    pub fn new(deadlines: Deadlines, vmm_started: Instant) -> Self {
        SessionState {
            deadlines,
            writer: None,
            agent_connected: false,
            signs: DeathSigns::default(),
            grace: None,
            timings: Timings { vmm_started: Some(vmm_started), ..Timings::default() },
        }
    }

    fn booted(&self) -> bool {
        self.timings.ready.is_some()
    }

    /// How long the caller may wait for the next event before calling [`Self::on_wake`].
    pub fn wake_at(&self, now: Instant) -> Instant {
        let mut at = match (self.booted(), self.deadlines.run) {
            (false, Some(run)) => run.min(self.deadlines.boot),
            (false, None) => self.deadlines.boot,
            (true, Some(run)) => run,
            (true, None) => now + Duration::from_secs(3600),
        };
        if let Some(grace) = self.grace {
            at = at.min(grace);
        }
        at
    }

    /// No event came before [`Self::wake_at`]: whichever deadline has passed decides.
    pub fn on_wake(&mut self, now: Instant) -> Step {
        if self.deadlines.run.is_some_and(|run| now >= run) {
            return Step::Done(Outcome::TimedOut);
        }
        if self.grace.is_some_and(|grace| now >= grace) {
            return Step::Done(Outcome::GuestFailed(std::mem::take(&mut self.signs).explain()));
        }
        if !self.booted() && self.grace.is_none() && now >= self.deadlines.boot {
            return Step::Done(Outcome::GuestFailed(format!(
                "the guest did not boot: expected the attest agent to report ready within {}s \
                 (--boot-timeout), but it never did",
                self.deadlines.boot_secs
            )));
        }
        Step::Wait
    }

    pub fn on_event(&mut self, event: Event, now: Instant) -> Step {
        let step = self.handle(event, now);
        if matches!(step, Step::Wait) && self.signs.complete() {
            return Step::Done(Outcome::GuestFailed(std::mem::take(&mut self.signs).explain()));
        }
        step
    }

    fn handle(&mut self, event: Event, now: Instant) -> Step {
        match event {
            Event::AgentConnected(writer) => {
                self.agent_connected = true;
                self.writer = Some(writer);
            }
            Event::Agent(GuestMessage::Ready { kernel_ms, modules_ms, ready_ms }) => {
                self.timings.ready = Some(now);
                (self.timings.kernel_ms, self.timings.modules_ms, self.timings.ready_ms) =
                    (kernel_ms, modules_ms, ready_ms);
                return match self.writer.take() {
                    Some(channel) => Step::Ready(channel),
                    None => Step::Done(Outcome::GuestFailed(
                        "the agent reported ready on a channel attest never saw".into(),
                    )),
                };
            }
            Event::Agent(GuestMessage::Started { .. }) => self.timings.started = Some(now),
            Event::Agent(GuestMessage::Exited { status, .. }) => {
                self.timings.exited = Some(now);
                return Step::Done(Outcome::Program(status));
            }
            Event::Agent(GuestMessage::Failed { stage, message }) => {
                return Step::Done(Outcome::GuestFailed(format!("the guest agent failed {stage}: {message}")));
            }
            Event::AgentClosed(why) => {
                self.signs.agent_lost = Some(why);
                self.grace.get_or_insert(now + DEATH_GRACE);
            }
            // Once the VMM is gone the channel is certain to reach its end, and the agent's last
            // frames (its exit report included) may still be in flight: with a connected agent that
            // end is awaited however long the reader takes, not a fixed grace.
            Event::Vm(VmEvent::VmmExited(status)) => {
                self.signs.vm_exit = Some(status);
                // A VMM failing before any agent connected refused to start: nothing more is
                // coming, and the caller reports the VMM's own message.
                if !self.agent_connected && matches!(status, ExitStatus::Code(code) if code != 0) {
                    return Step::Done(Outcome::GuestFailed(std::mem::take(&mut self.signs).explain()));
                }
                if !self.agent_connected {
                    self.grace.get_or_insert(now + DEATH_GRACE);
                }
            }
            Event::Vm(VmEvent::HelperFailed(why)) => {
                self.signs.helper_first |= self.signs.vm_exit.is_none();
                self.signs.helper_failed.get_or_insert(why);
                self.grace.get_or_insert(now + DEATH_GRACE);
            }
            Event::Signal(signal) => return Step::Done(Outcome::Interrupted(signal)),
        }
        Step::Wait
    }
}

/// What has been seen of a guest that is going away.
#[derive(Debug, Default)]
pub struct DeathSigns {
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

#[cfg(test)]
mod tests {
    use super::*;
    use attest_protocol::FailedStage;
    use std::os::unix::net::UnixStream;

    const SECOND: Duration = Duration::from_secs(1);

    /// A session booted 0 s ago with a 60 s boot deadline, optionally a run deadline, and its
    /// agent connected and ready.
    fn session(run: Option<Duration>) -> (SessionState, Instant, UnixStream) {
        let t0 = Instant::now();
        let deadlines = Deadlines { run: run.map(|d| t0 + d), boot: t0 + 60 * SECOND, boot_secs: 60.0 };
        (SessionState::new(deadlines, t0), t0, UnixStream::pair().unwrap().1)
    }

    fn connect_and_ready(state: &mut SessionState, peer: &UnixStream, at: Instant) {
        assert!(matches!(
            state.on_event(Event::AgentConnected(AgentWriter::new(peer.try_clone().unwrap())), at),
            Step::Wait
        ));
        let ready = GuestMessage::Ready { kernel_ms: 1, modules_ms: 2, ready_ms: 3 };
        assert!(matches!(state.on_event(Event::Agent(ready), at), Step::Ready(_)));
    }

    fn done(step: Step) -> Outcome {
        match step {
            Step::Done(outcome) => outcome,
            Step::Wait => panic!("expected the session to end, it waits"),
            Step::Ready(_) => panic!("expected the session to end, it is ready"),
        }
    }

    fn exited(code: i32) -> Event {
        Event::Agent(GuestMessage::Exited { status: ExitStatus::Code(code), exited_ms: 9 })
    }

    #[test]
    fn an_exit_report_arriving_after_the_vmm_exit_still_wins() {
        let (mut state, t0, peer) = session(None);
        connect_and_ready(&mut state, &peer, t0);
        let vm_gone = Event::Vm(VmEvent::VmmExited(ExitStatus::Code(0)));
        assert!(matches!(state.on_event(vm_gone, t0 + SECOND), Step::Wait), "must await the channel's end");
        // No grace runs out while the connected reader is still writing the program's output out.
        assert!(matches!(state.on_wake(t0 + 100 * SECOND), Step::Wait));
        assert_eq!(done(state.on_event(exited(3), t0 + 101 * SECOND)), Outcome::Program(ExitStatus::Code(3)));
    }

    #[test]
    fn a_vmm_exit_and_a_closed_channel_without_a_report_are_a_guest_failure() {
        let (mut state, t0, peer) = session(None);
        connect_and_ready(&mut state, &peer, t0);
        assert!(matches!(state.on_event(Event::AgentClosed("closed".into()), t0), Step::Wait));
        let outcome = done(state.on_event(Event::Vm(VmEvent::VmmExited(ExitStatus::Signal(9))), t0));
        assert_eq!(outcome, Outcome::GuestFailed("closed; the VM exited (killed by signal 9)".into()));
    }

    #[test]
    fn a_closed_channel_under_a_live_vmm_fails_after_the_grace() {
        let (mut state, t0, peer) = session(None);
        connect_and_ready(&mut state, &peer, t0);
        assert!(matches!(state.on_event(Event::AgentClosed("reset".into()), t0), Step::Wait));
        assert_eq!(state.wake_at(t0), t0 + DEATH_GRACE);
        assert!(matches!(state.on_wake(t0 + DEATH_GRACE - SECOND), Step::Wait));
        assert_eq!(done(state.on_wake(t0 + DEATH_GRACE)), Outcome::GuestFailed("reset".into()));
    }

    #[test]
    fn a_helper_dying_first_leads_the_explanation() {
        let (mut state, t0, peer) = session(None);
        connect_and_ready(&mut state, &peer, t0);
        state.on_event(Event::Vm(VmEvent::HelperFailed("virtiofsd exited".into())), t0);
        state.on_event(Event::Vm(VmEvent::VmmExited(ExitStatus::Code(1))), t0);
        let outcome = done(state.on_event(Event::AgentClosed("closed".into()), t0));
        assert_eq!(
            outcome,
            Outcome::GuestFailed("virtiofsd exited; then closed; the VM exited (exit status 1)".into())
        );
    }

    #[test]
    fn a_vmm_that_exits_before_the_agent_connects_fails_after_the_grace() {
        let (mut state, t0, _peer) = session(None);
        assert!(matches!(state.on_event(Event::Vm(VmEvent::VmmExited(ExitStatus::Code(0))), t0), Step::Wait));
        let outcome = done(state.on_wake(t0 + DEATH_GRACE));
        assert_eq!(outcome, Outcome::GuestFailed("the VM exited (exit status 0) before the program finished".into()));
    }

    #[test]
    fn a_vmm_that_fails_before_the_agent_connects_ends_the_session_at_once() {
        let (mut state, t0, _peer) = session(None);
        let outcome = done(state.on_event(Event::Vm(VmEvent::VmmExited(ExitStatus::Code(1))), t0));
        assert_eq!(outcome, Outcome::GuestFailed("the VM exited (exit status 1) before the program finished".into()));
    }

    #[test]
    fn boot_and_run_deadlines() {
        let (mut state, t0, _peer) = session(Some(30 * SECOND));
        assert_eq!(state.wake_at(t0), t0 + 30 * SECOND, "the run deadline comes before the boot's");
        assert_eq!(done(state.on_wake(t0 + 30 * SECOND)), Outcome::TimedOut);

        let (mut state, t0, _peer) = session(None);
        assert!(matches!(state.on_wake(t0 + 59 * SECOND), Step::Wait));
        let Outcome::GuestFailed(why) = done(state.on_wake(t0 + 60 * SECOND)) else { panic!() };
        assert!(why.contains("did not boot") && why.contains("60s"), "{why}");

        // The run deadline wins over a pending death grace.
        let (mut state, t0, peer) = session(Some(3 * SECOND));
        connect_and_ready(&mut state, &peer, t0);
        state.on_event(Event::AgentClosed("closed".into()), t0);
        assert_eq!(done(state.on_wake(t0 + 10 * SECOND)), Outcome::TimedOut);
    }

    #[test]
    fn agent_failures_signals_and_a_stray_ready() {
        let (mut state, t0, peer) = session(None);
        connect_and_ready(&mut state, &peer, t0);
        let failed = Event::Agent(GuestMessage::Failed { stage: FailedStage::Mount, message: "no fs".into() });
        let Outcome::GuestFailed(why) = done(state.on_event(failed, t0)) else { panic!() };
        assert_eq!(why, "the guest agent failed mounting the host's files: no fs");

        let (mut state, t0, _peer) = session(None);
        assert_eq!(done(state.on_event(Event::Signal(15), t0)), Outcome::Interrupted(15));

        let (mut state, t0, _peer) = session(None);
        let ready = GuestMessage::Ready { kernel_ms: 0, modules_ms: 0, ready_ms: 0 };
        assert!(matches!(done(state.on_event(Event::Agent(ready), t0)), Outcome::GuestFailed(_)));
    }
}
