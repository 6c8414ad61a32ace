# Files, ports, console lines and units that appear a few hundred ms after each wait starts (the
# trigger sleeps 0.5 s in the guest; its own round trip, ~100 ms on Debian under TCG, passes before
# the wait starts); every wait is
# run twice per round, once with attest's wait and once with the NixOS driver's algorithm for it
# (its `retry`: check, then sleep 1 s, as machine/__init__.py does), interleaved.
import time

ROUNDS = 5
DELAY = "0.5"


def nixos_retry(fn, timeout_seconds=900):
    """The NixOS driver's retry loop (driver's `retry`): check, sleep a second, repeat."""
    end = time.monotonic() + timeout_seconds
    while time.monotonic() < end:
        if fn(False):
            return
        time.sleep(1)
    assert fn(True)


def nixos_waits(m, i):
    return {
        "file": lambda: nixos_retry(lambda _: m.execute(f"test -e /tmp/w{i}")[0] == 0),
        "port": lambda: nixos_retry(lambda _: m.execute(f"nc -z localhost {7200 + i}")[0] == 0),
        "console": lambda: nixos_retry(lambda _: f"line-{i}-nixos" in m.get_console_log()),
        "unit": lambda: nixos_retry(lambda _: m.get_unit_info(f"w{i}n.service").get("ActiveState") == "active"),
    }


def attest_waits(m, i):
    return {
        "file": lambda: m.wait_for_file(f"/tmp/a{i}"),
        "port": lambda: m.wait_for_open_port(7300 + i),
        "console": lambda: m.wait_for_console_text(f"line-{i}-attest"),
        "unit": lambda: m.wait_for_unit(f"w{i}a.service"),
    }


def events(i, who, port):
    tag = "n" if who == "nixos" else "a"
    path = "w" if who == "nixos" else "a"
    return {
        "file": f"(sleep {DELAY}; touch /tmp/{path}{i}) >/dev/null 2>&1 &",
        "port": f"(sleep {DELAY}; exec nc -l -p {port}) >/dev/null 2>&1 &",
        "console": f"(sleep {DELAY}; echo line-{i}-{who} > /dev/ttyS0) >/dev/null 2>&1 &",
        # Activating (its start-up step sleeps) until it is active: a wait sees a job pending.
        "unit": f"systemd-run --quiet --no-block --unit=w{i}{tag} -p 'ExecStartPre=/bin/sleep {DELAY}' sleep 1000",
    }


machine.wait_for_unit("multi-user.target")
totals = {"attest": 0.0, "nixos": 0.0}
for i in range(ROUNDS):
    for who, waits, port in (("nixos", nixos_waits(machine, i), 7200 + i), ("attest", attest_waits(machine, i), 7300 + i)):
        triggers = events(i, who, port)
        for kind, wait in waits.items():
            machine.succeed(triggers[kind])
            started = time.monotonic()
            wait()
            totals[who] += time.monotonic() - started
waits = ROUNDS * 4
print(f"{waits} waits, each event {float(DELAY) * 1000:.0f} ms after its trigger command (Debian guest, TCG):")
print(f"  NixOS driver's algorithm: {totals['nixos']:.1f} s ({totals['nixos'] / waits * 1000:.0f} ms a wait)")
print(f"  attest:                   {totals['attest']:.1f} s ({totals['attest'] / waits * 1000:.0f} ms a wait)")
print(f"  ratio NixOS / attest: {totals['nixos'] / totals['attest']:.1f}x (goal: at least 2x)")
