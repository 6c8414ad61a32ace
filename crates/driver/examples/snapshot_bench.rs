//! Snapshot benchmarks, run by `bench/snapshots.sh` (not a test), on the Debian guest under the
//! accelerator attest chooses, in one process with a private snapshot cache:
//! - cold boot to the first command against a cached restore to the first command, interleaved;
//! - an in-test `restore` to the next command, and the save before it (time, state size);
//! - the memory (PSS) of 4 machines restored from one snapshot against 4 booted cold;
//! - a suite of ten one-machine tests, run cold and run cached, wall time.
//!
//!   cargo run --release -p attest-driver --example snapshot_bench -- [ROUNDS]

use std::time::{Duration, Instant};

use attest_driver::{BuiltinImage, Driver, DriverOptions, Log, MachineConfig, Ready, ReadyWord, TestConfig};

fn main() {
    let rounds: usize = std::env::args().nth(1).map(|n| n.parse().expect("ROUNDS is a number")).unwrap_or(3);
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("ATTEST_SNAPSHOT_CACHE", cache.path());

    // Prime the cache (and report the entry), untimed.
    let primed = Instant::now();
    drop(first_command(true));
    println!("first cached run (boot, save, restore): {:.2} s", primed.elapsed().as_secs_f64());
    let entry = std::fs::read_dir(cache.path()).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
    for file in std::fs::read_dir(&entry).unwrap().flatten() {
        let meta = file.metadata().unwrap();
        let on_disk = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        println!("  entry file {:<14} {:>8.1} MiB on disk", file.file_name().to_string_lossy(), mib(on_disk));
    }

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (t, _) = first_command(false);
        cold.push(t);
        let (w, driver) = first_command(true);
        warm.push(w);
        if round == 0 {
            in_test_restore(&driver);
        }
        println!("round {round}: cold {:.2} s, cached {:.3} s", t.as_secs_f64(), w.as_secs_f64());
    }
    let (cold, warm) = (median(cold), median(warm));
    println!(
        "boot to first command: cold {:.2} s, cached restore {:.3} s, ratio {:.3}",
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        warm.as_secs_f64() / cold.as_secs_f64()
    );

    let pss_cold = pss_of_four(false);
    let pss_warm = pss_of_four(true);
    println!(
        "PSS of 4 machines: booted cold {:.0} MiB, restored from one snapshot {:.0} MiB, ratio {:.2}",
        pss_cold,
        pss_warm,
        pss_warm / pss_cold
    );

    for cached in [false, true] {
        let started = Instant::now();
        for _ in 0..10 {
            let (_, driver) = first_command(cached);
            let m = driver.machine("bench").unwrap();
            m.succeed("echo test > /root/t && grep -q test /root/t", None).unwrap();
            m.succeed("systemctl is-system-running --wait || true", None).unwrap();
        }
        let which = if cached { "cached" } else { "cold" };
        println!("suite of ten one-machine tests, {which}: {:.1} s", started.elapsed().as_secs_f64());
    }
}

fn config(cached: bool) -> TestConfig {
    let mut machine = MachineConfig::image("bench", BuiltinImage::Debian).memory_mib(1024);
    if cached {
        machine = machine.ready(Ready::Shell(ReadyWord::Shell));
    }
    TestConfig::new(vec![machine])
}

fn driver(cached: bool) -> Driver {
    let options = DriverOptions { log: Log::to(Box::new(std::io::sink())), fresh: !cached, ..Default::default() };
    Driver::new(config(cached), options).expect("driver")
}

/// From the driver's start to the first command's answer.
fn first_command(cached: bool) -> (Duration, Driver) {
    let driver = driver(cached);
    let started = Instant::now();
    driver.machine("bench").unwrap().succeed("true", None).expect("first command");
    (started.elapsed(), driver)
}

fn in_test_restore(driver: &Driver) {
    let m = driver.machine("bench").unwrap();
    m.succeed("true", None).unwrap();
    let saving = Instant::now();
    m.snapshot("b").unwrap();
    let saved = saving.elapsed();
    let state = driver.state_dir().join("00-bench/snapshots/b/state");
    let size = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
    let mut times = Vec::new();
    for _ in 0..5 {
        m.succeed("echo after > /root/after", None).unwrap();
        let asked = Instant::now();
        m.restore("b").unwrap();
        m.succeed("true", None).unwrap();
        times.push(asked.elapsed());
    }
    println!(
        "in-test snapshot: save {:.2} s, state {:.0} MiB; restore to the next command {:.2} s (median of 5)",
        saved.as_secs_f64(),
        mib(size),
        median(times).as_secs_f64()
    );
}

/// The summed PSS of 4 machines of one definition, each in its own driver, all up at once.
fn pss_of_four(cached: bool) -> f64 {
    let drivers: Vec<Driver> = std::thread::scope(|scope| {
        let started: Vec<_> = (0..4).map(|_| scope.spawn(move || first_command(cached).1)).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for d in &drivers {
        d.machine("bench").unwrap().succeed("true", None).unwrap();
    }
    let me = std::process::id().to_string();
    let mut kib = 0u64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        if !stat.contains("(qemu-system-x86") || fields.get(1) != Some(&me.as_str()) {
            continue;
        }
        let rollup = std::fs::read_to_string(entry.path().join("smaps_rollup")).unwrap_or_default();
        let pss = rollup.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1));
        kib += pss.and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    drop(drivers);
    kib as f64 / 1024.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
