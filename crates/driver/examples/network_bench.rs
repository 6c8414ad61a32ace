//! VLAN benchmarks, run by `bench/network.sh` (not a test): two minimal guests on VLAN 1, in
//! switch mode (vde_switch) and in TAP mode (a bridge in a user+net namespace):
//! - TCP throughput: the client fetches 100 MB from busybox httpd on the server, against the floor
//!   of the same fetch over the server's own loopback (same programs, no virtual network);
//! - ping latency (average of 20), against ping of the guest's own loopback.
//!
//! Times are taken by the guest's clock around the transfer, so the driver's round trip is not in them.
//!
//!   cargo run --release -p attest-driver --example network_bench -- [RUNS]

use attest_driver::{BuiltinImage, Driver, DriverOptions, Log, Machine, MachineConfig, NetworkMode, TestConfig};

const SIZE: u64 = 100_000_000;

fn main() {
    let runs: usize = std::env::args().nth(1).map(|n| n.parse().expect("RUNS is a number")).unwrap_or(3);
    println!("| mode | throughput (MB/s) | loopback floor (MB/s) | ratio | ping (ms) | loopback ping (ms) | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for mode in [NetworkMode::Switch, NetworkMode::Tap] {
        let options = DriverOptions { log: Log::to(Box::new(std::io::sink())), ..DriverOptions::default() };
        let machines = ["client", "server"].map(|n| MachineConfig::image(n, BuiltinImage::Minimal).memory_mib(512));
        let config = TestConfig::new(machines.into()).vlans([1]).network(mode);
        let driver = Driver::new(config, options).expect("driver");
        let (client, server) = (driver.machine("client").unwrap(), driver.machine("server").unwrap());
        server
            .succeed(&format!("mkdir -p /srv && head -c {SIZE} /dev/zero > /srv/big && httpd -p 80 -h /srv"), None)
            .unwrap();
        client.succeed("wget -q -O /dev/null http://server/big", None).unwrap();
        let (mut network, mut floor) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            network.push(fetch(&client, "server"));
            floor.push(fetch(&server, "127.0.0.1"));
        }
        let (net, loopback) = (median(network), median(floor));
        let (ping, ping_floor) = (ping(&client, "server"), ping(&client, "127.0.0.1"));
        println!(
            "| {mode:?} | {net:.1} | {loopback:.1} | {:.2} | {ping:.3} | {ping_floor:.3} | {:.1} |",
            net / loopback,
            ping / ping_floor
        );
    }
}

/// MB/s of one 100 MB fetch from `host`, timed in the guest.
fn fetch(m: &Machine, host: &str) -> f64 {
    let clock = "${EPOCHREALTIME//[!0-9]/}";
    let script = format!("s={clock}; wget -q -O /dev/null http://{host}/big; echo $(( {clock} - s ))");
    let micros: f64 = m.succeed(&script, None).unwrap().trim().parse().unwrap();
    SIZE as f64 / micros
}

/// The average round trip of 20 pings to `host`, in ms.
fn ping(m: &Machine, host: &str) -> f64 {
    let output = m.succeed(&format!("ping -q -c 20 -i 0.2 {host}"), None).unwrap();
    // "round-trip min/avg/max = 0.345/0.567/1.234 ms"
    let figures = output.lines().find(|l| l.contains("min/avg/max")).and_then(|l| l.split(" = ").nth(1)).unwrap();
    figures.split('/').nth(1).unwrap().parse().unwrap()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
