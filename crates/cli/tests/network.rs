//! Networking in `attest exec` guests: loopback and the hostname always, the host through
//! `--net user` only when asked. Every test boots a real VM.

mod common;

use std::io::Write;
use std::net::TcpListener;

use common::*;

/// A TCP server on 127.0.0.1 and one on ::1, inside the guest, each answering its own client.
const LOOPBACK_ROUND_TRIP: &str = r#"
import socket
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    server = socket.socket(family)
    server.bind((host, 0))
    server.listen()
    client = socket.create_connection((host, server.getsockname()[1]), timeout=10)
    connection, _ = server.accept()
    client.sendall(b"ping")
    print(host, connection.recv(4).decode())
"#;

/// One boot answers both: loopback carries IPv4 and IPv6, and the guest is named as the host.
#[test]
fn loopback_is_up_for_ipv4_and_ipv6_and_the_guest_has_the_hosts_hostname() {
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let script = format!("{LOOPBACK_ROUND_TRIP}\nprint(socket.gethostname())\n");
    let run = exec(&[], &["/usr/bin/python3", "-c", &script]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout_text(), format!("127.0.0.1 ping\n::1 ping\n{host}\n"));
}

/// One `--net user` boot: the guest's address, default route and DNS are slirp's, and it reaches
/// a server on the host's loopback; without `--net` (or with `--net none`) it reaches nothing.
#[test]
fn net_user_gives_the_guest_its_address_route_and_dns_and_reaches_the_hosts_loopback() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut connection in listener.incoming().flatten() {
            connection.write_all(b"hello from the host\n").ok();
        }
    });
    let fetch = format!("exec 3<>/dev/tcp/10.0.2.2/{port} && cat <&3");
    let script = format!(
        "ip -4 -o addr show scope global | awk '{{print $2, $4}}'; ip route show default | cut -d' ' -f1-5; \
         cat /etc/resolv.conf; {fetch}"
    );
    let run = exec(&["--net", "user"], &["bash", "-c", &script]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout_text(),
        "eth0 10.0.2.15/24\ndefault via 10.0.2.2 dev eth0\nnameserver 10.0.2.3\nhello from the host\n"
    );

    let hermetic = exec(&[], &["bash", "-c", &fetch]);
    assert_ne!(hermetic.code, 0, "without --net the guest must not reach the host: {hermetic:?}");
    assert!(hermetic.stderr.contains("Network is unreachable"), "{hermetic:?}");
    let explicit = exec(&["--net", "none"], &["bash", "-c", &fetch]);
    assert!(explicit.stderr.contains("Network is unreachable"), "{explicit:?}");
}

#[test]
fn an_unknown_network_mode_is_a_usage_error() {
    let run = exec(&["--net", "bridge"], &["true"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--net"), "{run:?}");
}
