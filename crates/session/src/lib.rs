//! The host side of one session with attest's guest agent (PID 1 of `attest exec` guests): the
//! channel the host writes frames on ([`AgentWriter`], with stdin flow control), the thread that
//! reads the agent's frames ([`reader`]), and the decisions of the session's event loop
//! ([`SessionState`]): what each event means, when the run is over, and why.
//!
//! Callers own the loop itself (one channel of [`Event`]s, one `recv_timeout` until
//! [`SessionState::wake_at`]), so they can mix in their own events, such as terminal resizes.

mod channel;
pub mod reader;
mod state;

pub use channel::AgentWriter;
pub use state::{Deadlines, DeathSigns, Event, Outcome, SessionState, Step, Timings};
