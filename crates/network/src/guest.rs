//! Configuring attest's own guests (the minimal and Debian images, kernel + initrd machines) for
//! their networks, through their root shell once it connects: each card found by its MAC and given
//! its documented name, brought up with its addresses, and `/etc/hosts` naming the other machines.
//! Only `ip`, `sed` and the shell are needed (busybox has them). Running it again is harmless, and
//! it has no pipelines, which `pipefail` could fail on a SIGPIPE.

use std::fmt::Write;
use std::net::IpAddr;

use attest_machine::network::mac_text;

use crate::plan::{MachinePlan, PREFIX_V4, PREFIX_V6};

/// One card as the guest should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    pub mac: [u8; 6],
    pub name: String,
    pub addresses: Vec<(IpAddr, u8)>,
}

impl GuestNic {
    /// The cards of a machine's VLANs.
    pub fn vlans(plan: &MachinePlan) -> Vec<GuestNic> {
        let nic = |n: &crate::VlanNic| GuestNic {
            mac: n.mac,
            name: n.interface.clone(),
            addresses: vec![(IpAddr::V4(n.ipv4), PREFIX_V4), (IpAddr::V6(n.ipv6), PREFIX_V6)],
        };
        plan.nics.iter().map(nic).collect()
    }
}

/// Marks the `/etc/hosts` lines attest wrote, so a second run replaces them.
const HOSTS_MARK: &str = "# attest";

/// The shell commands that configure `nics` and write `hosts` into `/etc/hosts`.
pub fn configure_script(nics: &[GuestNic], hosts: &[(IpAddr, String)]) -> String {
    let mut script = String::from(
        "attest_link() { for d in /sys/class/net/*; do \
         if [ \"$(cat \"$d/address\")\" = \"$1\" ]; then echo \"${d##*/}\"; return 0; fi; done; \
         echo \"no network card has MAC $1 (is its driver loaded?)\" >&2; return 1; }\n",
    );
    // Renamed in two passes, through temporary names, so two cards can swap names.
    for (index, nic) in nics.iter().enumerate() {
        let (mac, name) = (mac_text(&nic.mac), &nic.name);
        writeln!(
            script,
            "d=$(attest_link {mac}); if [ \"$d\" != {name} ]; then ip link set dev \"$d\" down; \
             ip link set dev \"$d\" name attest-tmp{index}; fi"
        )
        .unwrap();
    }
    for nic in nics {
        let (mac, name) = (mac_text(&nic.mac), &nic.name);
        writeln!(
            script,
            "d=$(attest_link {mac}); if [ \"$d\" != {name} ]; then ip link set dev \"$d\" name {name}; fi"
        )
        .unwrap();
        // Without duplicate address detection an IPv6 address is usable at once, not after ~2 s.
        let dad = format!("/proc/sys/net/ipv6/conf/{name}/accept_dad");
        writeln!(script, "if [ -e {dad} ]; then echo 0 > {dad}; fi").unwrap();
        writeln!(script, "ip link set dev {name} up").unwrap();
        for (address, prefix) in &nic.addresses {
            let family = if address.is_ipv6() { "-6 " } else { "" };
            writeln!(
                script,
                "case \"$(ip {family}addr show dev {name})\" in *' {address}/{prefix} '*) ;; \
                 *) ip {family}addr add {address}/{prefix} dev {name};; esac"
            )
            .unwrap();
        }
    }
    if !hosts.is_empty() {
        writeln!(script, "touch /etc/hosts; sed -i '/ {HOSTS_MARK}$/d' /etc/hosts").unwrap();
        let lines: Vec<String> = hosts.iter().map(|(ip, name)| format!("'{ip} {name} {HOSTS_MARK}'")).collect();
        writeln!(script, "printf '%s\\n' {} >> /etc/hosts", lines.join(" ")).unwrap();
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Plan;

    /// The script runs against a real bash with a fake `ip` and `/sys/class/net`: the cards are
    /// found by MAC, the misnamed one is renamed through a temporary name, and addresses are added
    /// once however often it runs.
    #[test]
    fn the_script_renames_by_mac_and_is_idempotent() {
        let plan = Plan::new(&[1], [("a", &[1][..]), ("b", &[1][..])]).unwrap();
        let nics = GuestNic::vlans(plan.machine("b").unwrap());
        let script = configure_script(&nics, &plan.hosts_for("b"));
        assert!(script.contains("ip link set dev \"$d\" name eth1"), "{script}");
        assert!(script.contains("ip -6 addr add 2001:db8:1::2/64 dev eth1"), "{script}");
        assert!(script.contains("'192.168.1.1 a # attest' '2001:db8:1::1 a # attest'"), "{script}");

        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys/class/net/enp0s3");
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("address"), "52:54:00:12:01:02\n").unwrap();
        let log = root.path().join("ip.log");
        // A fake `ip` that records its calls and renames the fake sysfs entry.
        let fake_ip = format!(
            "ip() {{ echo \"ip $*\" >> {log}; if [ \"$1 $2\" = 'link set' ] && [ \"$5\" = name ]; then \
             mv {root}/sys/class/net/$4 {root}/sys/class/net/$6; fi; }}\n",
            log = log.display(),
            root = root.path().display()
        );
        let rooted = script
            .replace("/sys/class/net", &format!("{}/sys/class/net", root.path().display()))
            .replace("/etc/hosts", &root.path().join("hosts").display().to_string())
            .replace("/proc/sys", &root.path().join("proc").display().to_string());
        let run = || {
            let status = std::process::Command::new("bash")
                .args(["-c", &format!("set -euo pipefail\n{fake_ip}{rooted}")])
                .status()
                .unwrap();
            assert!(status.success());
        };
        run();
        run();
        let calls = std::fs::read_to_string(&log).unwrap();
        assert!(calls.starts_with("ip link set dev enp0s3 down\nip link set dev enp0s3 name attest-tmp0\n"), "{calls}");
        assert!(calls.contains("ip link set dev attest-tmp0 name eth1\n"), "{calls}");
        assert_eq!(calls.matches("ip addr add 192.168.1.2/24 dev eth1").count(), 2, "the fake ip shows no addresses");
        let hosts = std::fs::read_to_string(root.path().join("hosts")).unwrap();
        assert_eq!(hosts.lines().count(), 4, "the second run replaced the first's lines: {hosts}");
    }
}
