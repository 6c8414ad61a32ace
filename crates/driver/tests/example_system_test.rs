//! An example system test: copy this file into your crate's `tests/`, add `attest-driver` as a
//! dev-dependency, and run `cargo test`. It boots attest's Debian guest (built once by `attest
//! image debian`, then cached), starts a web server in it and checks what it serves. A failing call
//! returns an error that names this file's line and shows the machine's console tail.

use attest_driver::{BuiltinImage, Driver, DriverOptions, MachineConfig, Result, TestConfig};

#[test]
fn a_web_server_serves_its_page() -> Result<()> {
    let test = TestConfig::new(vec![MachineConfig::image("server", BuiltinImage::Debian)]);
    let driver = Driver::new(test, DriverOptions::default())?;
    let server = driver.machine("server")?;

    server.wait_for_unit("multi-user.target", None, None)?;
    server.succeed("mkdir -p /srv && echo 'hello from attest' > /srv/index.html", None)?;
    server.succeed("systemd-run --unit=web python3 -m http.server 80 --directory /srv", None)?;
    server.wait_for_open_port(80, None, None)?;
    assert_eq!(server.succeed("curl -sf http://localhost/", None)?, "hello from attest\n");
    Ok(())
}
