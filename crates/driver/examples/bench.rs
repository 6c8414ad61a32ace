//! Driver benchmarks, run by `bench/driver.sh` (not a test): one machine of a built-in guest, then
//! - the round trip of `succeed("true")` (median of N calls) against its floor: the guest running
//!   the very same backdoor command line (`attest_shell::command_line`) locally in a loop;
//! - wait latency: from the moment a file appears, a port opens or a console line is printed (stamped
//!   with the guest clock, mapped to the host's by a round-trip offset measured just before) to the
//!   wait's return;
//! - for the Debian guest, boot to the first command against systemd's own `systemd-analyze` total.
//!
//!   cargo run --release -p attest-driver --example bench -- minimal|debian [CALLS]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attest_driver::{BuiltinImage, Driver, DriverOptions, Log, Machine, MachineConfig, TestConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let image = match args.next().as_deref() {
        Some("debian") => BuiltinImage::Debian,
        Some("minimal") | None => BuiltinImage::Minimal,
        Some("overhead") => return call_overhead(),
        Some(other) => panic!("unknown guest {other}: minimal, debian or overhead"),
    };
    let calls: usize = args.next().map(|n| n.parse().expect("CALLS is a number")).unwrap_or(200);
    let options = DriverOptions { log: Log::to(Box::new(std::io::sink())), ..DriverOptions::default() };
    let machine = MachineConfig::image("bench", image).memory_mib(1024);
    let driver = Driver::new(TestConfig::new(vec![machine]), options).expect("driver");
    let m = driver.machine("bench").unwrap();

    let started = Instant::now();
    m.succeed("true", None).expect("boot");
    let boot = started.elapsed();
    println!("guest: {image:?}");
    println!("boot to first command: {:.2} s", boot.as_secs_f64());
    if image == BuiltinImage::Debian {
        m.succeed("systemctl is-system-running --wait || true", None).unwrap();
        let analyze = m.succeed("systemd-analyze", None).unwrap();
        let total = analyze.lines().next().and_then(|l| l.rsplit("= ").next()).unwrap_or("?").to_string();
        println!("systemd-analyze: {}", analyze.lines().next().unwrap_or_default());
        println!(
            "ratio boot to first command / systemd's total ({}): {:.2}",
            total.trim(),
            boot.as_secs_f64() / seconds(&total)
        );
    }

    // Warm up, then interleave: a block of calls, a block of the floor, so drift hits both alike.
    for _ in 0..10 {
        m.succeed("true", None).unwrap();
    }
    let (mut trips, mut floor, mut nixos) = (Vec::new(), Vec::new(), Vec::new());
    // The line of a command without the occasional bulk removal of output files.
    let line = attest_shell::command_line("true", None, 1, false);
    // What the NixOS driver sends for the same command.
    let nixos_line = "bash -c 'set -euo pipefail; true' | (base64 -w 0; echo)";
    let per_block = 20;
    let in_guest = |line: &str| {
        let script = format!(
            "for i in $(seq {per_block}); do s=${{EPOCHREALTIME/./}}; {{ {}; }} >/dev/null; e=${{EPOCHREALTIME/./}}; echo $((e - s)); done",
            line.trim_end()
        );
        let out = m.succeed(&script, None).unwrap();
        out.lines().map(|us| Duration::from_micros(us.parse().unwrap())).collect::<Vec<_>>()
    };
    for _ in 0..calls.div_ceil(per_block) {
        for _ in 0..per_block {
            let t = Instant::now();
            m.succeed("true", None).unwrap();
            trips.push(t.elapsed());
        }
        floor.extend(in_guest(&line));
        nixos.extend(in_guest(nixos_line));
    }
    let (trip, local, theirs) = (median(&mut trips), median(&mut floor), median(&mut nixos));
    println!("succeed(\"true\") round trip, median of {}: {:.1} ms", trips.len(), ms(trip));
    println!("floor, the same command line run in the guest, median of {}: {:.1} ms", floor.len(), ms(local));
    println!("ratio round trip / floor: {:.2}", trip.as_secs_f64() / local.as_secs_f64());
    println!(
        "for comparison, NixOS's command line run in the guest: {:.1} ms (ours / NixOS's: {:.2})",
        ms(theirs),
        local.as_secs_f64() / theirs.as_secs_f64()
    );

    for (what, setup, event, wait) in waits() {
        let mut latencies = Vec::new();
        for i in 0..10 {
            m.succeed(&setup.replace("{i}", &i.to_string()), None).unwrap();
            let offset = clock_offset(&m);
            m.succeed(&format!("(sleep 0.5; {}) >/dev/null 2>&1 &", event.replace("{i}", &i.to_string())), None)
                .unwrap();
            wait(&m, i);
            let returned = now();
            let at: f64 = m.succeed("cat /tmp/bench-event-time", None).unwrap().trim().parse().unwrap();
            latencies.push(Duration::from_secs_f64((returned - (at - offset)).max(0.0)));
        }
        println!(
            "wait latency, {what}: median of 10: {:.0} ms (goal: 100 ms + one round trip = {:.0} ms)",
            ms(median(&mut latencies)),
            100.0 + ms(trip)
        );
    }
}

/// The floor of a script's per-call overhead: the same call (`is_up`, no VM work) made from Rust.
fn call_overhead() {
    let options = DriverOptions { log: Log::to(Box::new(std::io::sink())), ..DriverOptions::default() };
    let machine = MachineConfig::image("machine", BuiltinImage::Minimal);
    let driver = Driver::new(TestConfig::new(vec![machine]), options).expect("driver");
    let m = driver.machine("machine").unwrap();
    let mut samples: Vec<Duration> = (0..1000)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(m.is_up());
            started.elapsed()
        })
        .collect();
    println!("rust: machine.is_up(), median of 1000: {:.1} us", median(&mut samples).as_secs_f64() * 1e6);
}

type Wait = fn(&Machine, usize);

/// (what, setup command, the event with its guest time stamp, the wait); `{i}` is the sample.
fn waits() -> Vec<(&'static str, &'static str, String, Wait)> {
    let stamp = "echo $EPOCHREALTIME > /tmp/bench-event-time";
    let file: Wait = |m, i| m.wait_for_file(&format!("/tmp/bench-file-{i}"), None).unwrap();
    let port: Wait = |m, i| m.wait_for_open_port(7100 + i as u16, Some("127.0.0.1"), None).unwrap();
    let line: Wait = |m, i| drop(m.wait_for_console_text(&format!("bench-line-{i}\\b"), None).unwrap());
    vec![
        // Stamped once the file exists (`touch` is a program; its start-up is not the wait's).
        ("a file appears", "rm -f /tmp/bench-file-{i}", format!("touch /tmp/bench-file-{{i}}; {stamp}"), file),
        // Stamped before `nc` starts listening: this figure includes nc's start-up.
        ("a port opens (includes nc's start-up)", "true", format!("{stamp}; exec nc -l -p 710{{i}}"), port),
        ("a console line is printed", "true", format!("{stamp}; echo bench-line-{{i}} > /dev/ttyS0"), line),
    ]
}

/// Guest clock minus host clock, in seconds, from the middle of one round trip.
fn clock_offset(m: &Machine) -> f64 {
    let before = now();
    let guest: f64 = m.succeed("echo $EPOCHREALTIME", None).unwrap().trim().parse().unwrap();
    let after = now();
    guest - (before + after) / 2.0
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `1min 2.345s` or `12.345s` as seconds.
fn seconds(text: &str) -> f64 {
    let mut total = 0.0;
    for part in text.split_whitespace() {
        if let Some(min) = part.strip_suffix("min") {
            total += min.parse::<f64>().unwrap_or(0.0) * 60.0;
        } else if let Some(ms) = part.strip_suffix("ms") {
            total += ms.parse::<f64>().unwrap_or(0.0) / 1000.0;
        } else if let Some(s) = part.strip_suffix('s') {
            total += s.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}
