//! What the driver's VM tests share: whether this host can run them (else they print why and skip),
//! and a driver whose log is captured with the test's output.
// Each test crate uses a part of this module.
#![allow(dead_code)]

use attest_driver::{Driver, DriverOptions, MachineConfig, TestConfig};

/// Why the minimal guest cannot boot here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if attest_machine::Qemu::find_binary().is_none() {
        return Some("qemu-system-x86_64 not found".into());
    }
    if attest_image::kernel::locate(None, &attest_image::cache_dir()).is_err() {
        return Some("no guest kernel (scripts/setup fetches one)".into());
    }
    if let Err(e) = attest_image::find_busybox() {
        return Some(e.to_string());
    }
    attest_image::backdoor::find_static_bash().err().map(|e| e.to_string())
}

/// A driver for `machines`, or `None` after printing why this host cannot run it.
pub fn driver(machines: Vec<MachineConfig>) -> Option<Driver> {
    driver_with(TestConfig::new(machines))
}

pub fn driver_with(config: TestConfig) -> Option<Driver> {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return None;
    }
    Some(Driver::new(config, DriverOptions::default()).expect("the driver starts"))
}

/// Why the Debian guest cannot be built or booted here, if it cannot.
pub fn missing_debian_prerequisite() -> Option<String> {
    if let Some(why) = missing_prerequisite() {
        return Some(why);
    }
    for tool in ["debootstrap", "mkfs.ext4", "qemu-img"] {
        if which::which(tool).is_err() {
            return Some(format!("{tool} not found (scripts/setup installs it)"));
        }
    }
    None
}

/// The test case names of a JUnit report, which must parse as XML.
pub fn junit_cases(xml: &str) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut names = Vec::new();
    loop {
        match reader.read_event().expect("the JUnit report parses") {
            Event::Eof => return names,
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                let name = e.try_get_attribute("name").unwrap().expect("a test case has a name");
                names.push(String::from_utf8(name.value.to_vec()).unwrap());
            }
            _ => {}
        }
    }
}
