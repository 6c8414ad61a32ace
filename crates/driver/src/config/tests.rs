//! The test definitions read from TOML: what they become, and the errors that name their line.

use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<TestConfig> {
    TestConfig::from_toml(text, Path::new("/tests"))
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn a_full_definition_reads_as_the_builder_would_make_it() {
    let test = parse(
        r#"
global_timeout = 600
script = "test.py"

[machines.server]
image = "debian"
memory = 2048
qemu_args = ["-device", "virtio-balloon"]
blank_disks = [{ size = "2G" }, { size = 64, format = "raw", bus = "scsi" }]

[machines.client]
kernel = "bzImage"
initrd = "/boot/initrd"
cmdline = "console=ttyS0"
disk = "root.qcow2"
allow_reboot = true
boot_timeout = 90
"#,
    )
    .unwrap();
    assert_eq!(test.global_timeout, Duration::from_secs(600));
    assert_eq!(test.extra["script"].as_str(), Some("test.py"));
    let server = MachineConfig::image("server", BuiltinImage::Debian)
        .memory_mib(2048)
        .qemu_args(["-device", "virtio-balloon"])
        .blank_disk(2048, DiskFormat::Qcow2);
    let mut server = server;
    server.blank_disks.push(BlankDisk { size_mib: 64, format: DiskFormat::Raw, bus: DiskBus::Scsi });
    let client = MachineConfig::new(
        "client",
        BootConfig::Kernel {
            kernel: "/tests/bzImage".into(),
            initrd: Some("/boot/initrd".into()),
            cmdline: "console=ttyS0".into(),
            disk: Some("/tests/root.qcow2".into()),
        },
    )
    .allow_reboot(true)
    .boot_timeout(Duration::from_secs(90));
    // Machines come in name order, which NixOS's node numbers follow too.
    assert_eq!(test.machines, [client, server]);
}

#[test]
fn conditions_and_login_read_as_declared() {
    use crate::conditions::Kind;
    let test = parse(
        r#"
[machines.installer]
iso = "installer.iso"
firmware = "uefi"
login = { user = "tester", password = "pw", sudo = true }
[[machines.installer.conditions]]
name = "provisioned"
unit = "provision.service"
state = "inactive"
within = 300
[[machines.installer.conditions]]
name = "volume"
logical_volume = "main/slash"
"#,
    )
    .unwrap();
    let machine = &test.machines[0];
    assert_eq!(machine.login, Some(Login { user: "tester".into(), password: Some("pw".into()), sudo: true }));
    let kinds: Vec<&Kind> = machine.conditions.iter().map(|c| &c.kind).collect();
    assert_eq!(
        kinds,
        [
            &Kind::Unit { unit: "provision.service".into(), state: "inactive".into() },
            &Kind::LogicalVolume { name: "main/slash".into() }
        ]
    );
    assert_eq!(machine.conditions[0].within, Some(Duration::from_secs(300)));
    assert_eq!(machine.firmware, FirmwareKind::Uefi);
    assert!(error("[machines.a]\nimage = \"minimal\"\nfirmware = \"uefi\"\n").contains("`firmware` is for machines"));
    let bad =
        |condition: &str| error(&format!("[machines.a]\nimage = \"minimal\"\n[[machines.a.conditions]]\n{condition}"));
    assert!(bad("name = \"x\"\n").contains("checks nothing"), "{}", bad("name = \"x\"\n"));
    assert!(bad("name = \"x\"\nunit = \"a\"\nfile = \"/b\"\n").contains("`unit` and `file` are two kinds"));
    assert!(bad("name = \"x\"\nunit = \"a\"\n").contains("needs `state`"));
    assert!(bad("name = \"x\"\nfile = \"/a\"\nstate = \"active\"\n").contains("`state` goes with `unit`"));
    assert!(bad("name = \"x\"\nlogical_volume = \"slash\"\n").contains("named VG/LV"));
    assert!(bad("name = \"x\"\nconsole = \"(\"\n").contains("bad regex"));
    assert!(bad("name = \"x\"\nfile = \"/a\"\nsize = 3\n").contains("unknown field `size`"));
}

#[test]
fn vlans_default_to_nixos_vlan_one() {
    let test = parse(
        "vlans = [1, 2]\nnetwork = \"tap\"\n[machines.a]\nimage = \"minimal\"\n[machines.b]\nimage = \"minimal\"\nvlans = [2]\n",
    )
    .unwrap();
    assert_eq!((test.vlans.as_slice(), test.network), (&[1, 2][..], NetworkMode::Tap));
    let joins: Vec<Vec<u32>> = test.machines.iter().map(|m| m.joins(&test.vlans)).collect();
    assert_eq!(joins, [vec![1], vec![2]]);
    assert!(MachineConfig::image("c", BuiltinImage::Minimal).joins(&[2]).is_empty());
}

#[test]
fn start_scripts_iso_and_disk_boot_sources() {
    let test = parse(
        r#"
[machines.server]
start_script = "/nix/store/x/bin/run-server-vm"
qemu_opts = "-m 2048"
[machines.installer]
iso = "nixos.iso"
blank_disks = [{ size = "8G" }]
[machines.legacy]
disk = "/images/old.raw"
"#,
    )
    .unwrap();
    let boots: Vec<&BootConfig> = test.machines.iter().map(|m| &m.boot).collect();
    assert_eq!(
        boots,
        [
            &BootConfig::Iso("/tests/nixos.iso".into()),
            &BootConfig::Disk("/images/old.raw".into()),
            &BootConfig::StartScript {
                path: "/nix/store/x/bin/run-server-vm".into(),
                qemu_opts: Some("-m 2048".into()),
                kernel_params: None
            },
        ]
    );
    assert_eq!(MachineConfig::start_script("/x/run-db-vm").unwrap().name, "db");
    assert!(MachineConfig::start_script("/x/start-db").is_err());
}

#[test]
fn bad_definitions_name_the_line_and_the_fix() {
    assert!(
        error("[machines.a]\nimage = \"debian\"\nmemory = \"lots\"\n").starts_with("3: invalid type"),
        "{}",
        error("[machines.a]\nimage = \"debian\"\nmemory = \"lots\"\n")
    );
    let unknown = error("\n[machines.a]\nbackend = \"bochs\"\nimage = \"debian\"\n");
    assert!(
        unknown.starts_with("3: unknown variant `bochs`, expected one of `qemu`, `firecracker`, `cloud-hypervisor`"),
        "{unknown}"
    );
    let duplicate = error("[machines.a]\nimage = \"debian\"\n[machines.a]\nimage = \"minimal\"\n");
    assert!(duplicate.starts_with("3: ") && duplicate.contains("duplicate"), "{duplicate}");
    let two = error("[machines.a]\nimage = \"debian\"\nkernel = \"/k\"\n");
    assert_eq!(two, "1: machine a: `image` and `kernel` are both boot sources; keep one");
    let none = error("\n\n[machines.a]\nmemory = 512\n");
    assert!(none.starts_with("3: machine a has nothing to boot"), "{none}");
    let typo = error("[machines.a]\nimage = \"debian\"\nmemroy = 5\n");
    assert!(typo.starts_with("3: unknown field `memroy`"), "{typo}");
    assert!(error("[machines.a]\nimage = \"minimal\"\ndisk = \"x\"\n").contains("`disk` does not go with `image`"));
    assert!(error("[machines.a]\nstart_script = \"/bin/run-b-vm\"\n").contains("its start script is for machine \"b\""));
    assert!(error("[machines.a]\nimage = \"debian\"\nblank_disks = [{ size = \"2Q\" }]\n").contains("unit must be"));
    assert!(error("global_timeout = 5\n").contains("defines no machines"));
    assert!(error("network = \"bridge\"\n[machines.a]\nimage = \"minimal\"\n").contains("unknown variant `bridge`"));
    assert!(error("[machines.a]\nstart_script = \"/bin/run-a-vm\"\nvlans = [1]\n").contains("drop `vlans`"));
    assert!(error("[machines.a\n").starts_with("1: "), "{}", error("[machines.a\n"));
}

#[test]
fn values_that_cannot_work_are_problems_with_their_fix() {
    let keys = |text: &str| -> Vec<&'static str> { parse(text).unwrap().problems().iter().map(|p| p.key).collect() };
    let machine = |keys: &str| format!("[machines.a]\nimage = \"minimal\"\n{keys}\n");
    assert!(keys(&machine("cpus = 2\nmemory = 512")).is_empty());
    assert_eq!(keys(&machine("cpus = 0")), ["cpus"]);
    assert_eq!(keys(&machine("cpus = 1000")), ["cpus"]);
    assert_eq!(keys(&machine("memory = 0")), ["memory"]);
    assert_eq!(keys(&machine("blank_disks = [{ size = 0 }, { size = \"1G\" }]")), ["blank_disks"]);
    assert_eq!(keys(&machine("boot_timeout = 0")), ["boot_timeout"]);
    assert_eq!(keys(&format!("global_timeout = 0\n{}", machine(""))), ["global_timeout"]);
    assert_eq!(keys(&format!("vlans = [0]\n{}", machine(""))), ["vlans"]);
    assert_eq!(keys(&format!("vlans = [1]\n{}", machine("vlans = [2]"))), ["vlans"]);

    let cpus = &parse(&machine("cpus = 0")).unwrap().problems()[0];
    assert_eq!(cpus.what, "machine a: cpus = 0, but a q35 machine takes 1 to 255 vCPUs");
    assert_eq!(cpus.fix, "set cpus between 1 and 255");
    let vlan = parse(&format!("vlans = [0]\n{}", machine(""))).unwrap().validate().unwrap_err().to_string();
    assert!(
        vlan.starts_with("VLAN 0 is out of range") && vlan.contains("fix: number the VLANs from 1 to 255"),
        "{vlan}"
    );
    // The builder's values follow the same rules.
    assert_eq!(MachineConfig::image("b", BuiltinImage::Minimal).cpus(0).problems()[0].key, "cpus");
}

#[test]
fn machine_names_are_identifiers() {
    // A TOML name that could leave the output directory is refused at its table's line.
    let escape = error("global_timeout = 60\n\n[machines.\"../x\"]\nimage = \"minimal\"\n");
    assert_eq!(
        escape,
        "3: machine name \"../x\" starts with '.': a name is an ASCII letter or _, then letters, digits, _ or -"
    );
    let slash = error("[machines.\"a/b\"]\nimage = \"minimal\"\n");
    assert!(slash.starts_with("1: machine name \"a/b\" has '/' in it"), "{slash}");
    assert!(error("[machines.\"\"]\nimage = \"minimal\"\n").starts_with("1: the machine name is empty"));
    assert!(error("[machines.1st]\nimage = \"minimal\"\n").starts_with("1: machine name \"1st\" starts with '1'"));
    // NixOS's node names: `-` is allowed after the first character.
    let names = parse("[machines.my-client]\nimage = \"minimal\"\n[machines._b2]\nimage = \"minimal\"\n").unwrap();
    assert_eq!(names.machines.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["_b2", "my-client"]);

    for bad in ["..", "a/b", "../x", "a.b", "-a", "a b", "é", ""] {
        assert!(check_name("snapshot", bad).is_err(), "{bad:?}");
    }
    for good in ["a", "server", "_x", "my-client", "node_2", "A1-b_c"] {
        assert_eq!(check_name("snapshot", good), Ok(()), "{good:?}");
    }

    // The builder's names go through the same rule.
    let problem = &MachineConfig::image("../x", BuiltinImage::Minimal).problems()[0];
    assert_eq!(
        (problem.key, problem.what.as_str()),
        ("name", "machine name \"../x\" starts with '.': a name is an ASCII letter or _, then letters, digits, _ or -")
    );
    let test = TestConfig::new(vec![MachineConfig::image("a/b", BuiltinImage::Minimal)]);
    assert!(test.validate().unwrap_err().to_string().starts_with("machine name \"a/b\" has '/' in it"));
    // Two names a script would see as one variable.
    let twins = ["a-b", "a_b"].map(|n| MachineConfig::image(n, BuiltinImage::Minimal));
    let problems = TestConfig::new(twins.to_vec()).problems();
    assert_eq!(
        problems.iter().map(|p| p.what.as_str()).collect::<Vec<_>>(),
        ["machines a-b and a_b are both `a_b` in a test script"]
    );
}
