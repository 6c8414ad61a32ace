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

    // Without --net the connection goes nowhere: no answer, as on a host whose uplink is dead.
    let nowhere = format!("timeout 3 bash -c '{fetch}'; echo $?");
    let hermetic = exec(&[], &["bash", "-c", &nowhere]);
    assert_eq!(hermetic.stdout_text(), "124\n", "without --net the guest must not reach the host: {hermetic:?}");
    let explicit = exec(&["--net", "none"], &["bash", "-c", &nowhere]);
    assert_eq!(explicit.stdout_text(), "124\n", "{explicit:?}");
}

/// `--net none` is a network that goes nowhere, not no network: a datagram to anywhere is sent
/// (and lost), over IPv4 and IPv6, as on a host whose uplink is dead, instead of failing with
/// ENETUNREACH; and the guest has only loopback and the dummy interface it is routed into.
#[test]
fn net_none_sends_datagrams_nowhere_as_a_host_with_a_dead_uplink_does() {
    let script = r#"
import socket
for family, host in ((socket.AF_INET, "1.2.3.4"), (socket.AF_INET6, "2001:db8::1")):
    print(host, socket.socket(family, socket.SOCK_DGRAM).sendto(b"x", (host, 8080)))
"#;
    let run = exec(&[], &["sh", "-c", &format!("ls /sys/class/net; ip route; /usr/bin/python3 -c '{script}'")]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout_text(),
        "dummy0\nlo\ndefault dev dummy0 proto static scope link \n1.2.3.4 1\n2001:db8::1 1\n"
    );
}

/// Without a terminal the program is not a session leader, as on a host (where the shell is):
/// opening a pty's slave without O_NOCTTY then makes it no controlling terminal, and closing the
/// master sends no SIGHUP. (NixOS-style pty tests died of that, exit 129.)
#[test]
fn without_a_terminal_the_program_leads_no_session_and_survives_a_closed_pty() {
    let script = r#"
import os
m, s = os.openpty(); fd = os.open(os.ttyname(s), os.O_RDWR)
os.close(fd); os.close(s); os.close(m)
print("survived", os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid())
"#;
    let run = exec(&["--no-stdin"], &["/usr/bin/python3", "-c", script]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout_text(), "survived False True\n");
}

#[test]
fn an_unknown_network_mode_is_a_usage_error() {
    let run = exec(&["--net", "bridge"], &["true"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--net"), "{run:?}");
}
