//! attest guest init: PID 1 of `attest exec` guests.
//!
//! Brings up the minimal system (kernel filesystems, driver modules), reaches the host over the agent
//! virtio-serial port, mounts the host's shares, runs the requested program and reports its streams and
//! exit status. After a report it waits for the host to hang up (the host then kills the VM); on any
//! failure, and after the hang-up, it syncs and powers the VM off: PID 1 must never return.

mod mounts;
mod net;
mod run;
mod system;
mod terminal;

use anyhow::{Context, Result};
use attest_protocol::{FailedStage, Frame, GuestMessage, HostMessage};

fn main() {
    if let Err(err) = boot() {
        // stdout of PID 1 is /dev/console, which the host keeps as the console log.
        println!("attest-init: error: {err:#}");
    }
    system::power_off();
}

fn boot() -> Result<()> {
    system::mount_kernel_filesystems()?;
    let kernel_ms = system::uptime_ms();
    system::load_modules();
    let modules_ms = system::uptime_ms();
    let channel = system::open_channel()?;
    let writer = run::FrameWriter::new(channel.try_clone()?);
    writer.send(Frame::Guest(GuestMessage::Ready { kernel_ms, modules_ms, ready_ms: system::uptime_ms() }))?;

    let mut reader = channel;
    let start = match Frame::read_from(&mut reader).context("reading the start request")? {
        Some(Frame::Host(HostMessage::Start(start))) => start,
        Some(other) => anyhow::bail!("expected a start request, got {other:?}"),
        None => anyhow::bail!("host closed the agent channel before sending a start request"),
    };

    let outcome = net::configure(&start.hostname, &start.network)
        .map_err(|e| (FailedStage::Network, e))
        .and_then(|()| mounts::prepare_root(&start).map_err(|e| (FailedStage::Mount, e)))
        .and_then(|()| run::run_program(&start, reader, &writer).map_err(|e| (FailedStage::Run, e)));
    if let Err((stage, err)) = outcome {
        let message = format!("{err:#}");
        println!("attest-init: {stage} failed: {message}");
        writer.send(Frame::Guest(GuestMessage::Failed { stage, message }))?;
    }
    Ok(())
}
