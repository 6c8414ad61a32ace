"""attest's test-script runtime: the NixOS test driver's testScript globals, backed by attest's Rust
driver. The Python side stays thin: every machine call is one JSON line over a unix socket to the
`attest` process (one connection per Python thread), which runs it on the driver and answers with
its result or its error. Retries, polling conditions and subtests are plain Python, as in NixOS.

attest writes this file next to the script's state and runs `python3 -m attest_driver SCRIPT` with
ATTEST_DRIVER_SOCKET set; nothing needs installing.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
import unittest
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple


class RequestedAssertionFailed(AssertionError):
    """The test's expectation failed: a command failed, a wait timed out, an assertion on `t`."""


class MachineError(Exception):
    """A machine could not do what was asked: it died, never booted, or its channel broke."""


class PollingConditionError(RequestedAssertionFailed):
    """A polling condition did not hold before a machine call."""


class GlobalTimeout(MachineError):
    """The test's global timeout expired; every machine was stopped."""


_ERRORS = {"assertion": RequestedAssertionFailed, "machine": MachineError, "timeout": GlobalTimeout}
_local = threading.local()


def _connection() -> Any:
    conn = getattr(_local, "conn", None)
    if conn is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.environ["ATTEST_DRIVER_SOCKET"])
        conn = _local.conn = sock.makefile("rwb")
    return conn


def _call(machine: Optional[str], call: str, **args: Any) -> Any:
    """One request to the driver; its error becomes the matching exception, raised here."""
    conn = _connection()
    conn.write(json.dumps({"machine": machine, "call": call, "args": args}).encode() + b"\n")
    conn.flush()
    line = conn.readline()
    if not line:
        raise MachineError("the attest driver went away")
    reply = json.loads(line)
    if "ok" in reply:
        return reply["ok"]
    error = reply["err"]
    raise _ERRORS.get(error["kind"], MachineError)(error["message"])


class _Conditions:
    """The active polling conditions, checked before machine calls (not from inside a check)."""

    active: List["PollingCondition"] = []
    checking = threading.local()

    @classmethod
    def check_all(cls) -> None:
        if getattr(cls.checking, "on", False):
            return
        cls.checking.on = True
        try:
            for condition in list(cls.active):
                condition.maybe_raise()
        finally:
            cls.checking.on = False


class Machine:
    """A machine of the test, with the NixOS driver's methods, names and defaults."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Machine '{self.name}'>"

    def _call(self, call: str, **args: Any) -> Any:
        _Conditions.check_all()
        return _call(self.name, call, **args)

    # Commands.
    def execute(
        self, command: str, check_return: bool = True, check_output: bool = True, timeout: Optional[int] = 900
    ) -> Tuple[int, str]:
        status, output = self._call("execute", command=command, timeout=timeout)
        if not check_output:
            return (-2, "")
        if not check_return:
            return (-1, output)
        return (status, output)

    def succeed(self, *commands: str, timeout: Optional[int] = None) -> str:
        return "".join(self._call("succeed", command=command, timeout=timeout) for command in commands)

    def fail(self, *commands: str, timeout: Optional[int] = None) -> str:
        return "".join(self._call("fail", command=command, timeout=timeout) for command in commands)

    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        return self._call("wait_until_succeeds", command=command, timeout=timeout)

    def wait_until_fails(self, command: str, timeout: int = 900) -> str:
        return self._call("wait_until_fails", command=command, timeout=timeout)

    def sleep(self, secs: int) -> None:
        self._call("sleep", secs=secs)

    def systemctl(self, q: str, user: Optional[str] = None) -> Tuple[int, str]:
        status, output = self._call("systemctl", q=q, user=user)
        return (status, output)

    def start_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        status, output = self._call("start_job", jobname=jobname, user=user)
        return (status, output)

    def stop_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        status, output = self._call("stop_job", jobname=jobname, user=user)
        return (status, output)

    # Units.
    def get_unit_info(self, unit: str, user: Optional[str] = None) -> Dict[str, str]:
        return self._call("get_unit_info", unit=unit, user=user)

    def get_unit_property(self, unit: str, property: str, user: Optional[str] = None) -> str:
        return self._call("get_unit_property", unit=unit, property=property, user=user)

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        self._call("require_unit_state", unit=unit, require_state=require_state)

    def wait_for_unit(self, unit: str, user: Optional[str] = None, timeout: int = 900) -> None:
        self._call("wait_for_unit", unit=unit, user=user, timeout=timeout)

    # Waits.
    def wait_for_file(self, filename: str, timeout: int = 900) -> None:
        self._call("wait_for_file", filename=filename, timeout=timeout)

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        self._call("wait_for_open_port", port=port, addr=addr, timeout=timeout)

    def wait_for_closed_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        self._call("wait_for_closed_port", port=port, addr=addr, timeout=timeout)

    def wait_for_open_unix_socket(self, addr: str, is_datagram: bool = False, timeout: int = 900) -> None:
        self._call("wait_for_open_unix_socket", addr=addr, is_datagram=is_datagram, timeout=timeout)

    def wait_for_console_text(self, regex: str, timeout: Optional[int] = None) -> None:
        self._call("wait_for_console_text", regex=regex, timeout=timeout)

    def get_console_log(self) -> str:
        return self._call("get_console_log")

    def wait_for_x(self, timeout: int = 900) -> None:
        self.wait_until_succeeds(
            "journalctl -b SYSLOG_IDENTIFIER=systemd | grep 'Reached target Current graphical'"
            " && test -e /tmp/.X11-unix/X0",
            timeout=timeout,
        )

    def get_window_names(self) -> List[str]:
        output = self.succeed(r"xwininfo -root -tree | sed 's/.*0x[0-9a-f]* \"\([^\"]*\)\".*/\1/; t; d'")
        return output.splitlines()

    def wait_for_window(self, regexp: str, timeout: int = 900) -> None:
        import re

        pattern = re.compile(regexp)
        retry(lambda _last: any(pattern.search(name) for name in self.get_window_names()), timeout)

    # Screen and keyboard.
    def get_tty_text(self, tty: str) -> str:
        return self._call("get_tty_text", tty=int(tty))

    def wait_until_tty_matches(self, tty: str, regexp: str, timeout: int = 900) -> None:
        self._call("wait_until_tty_matches", tty=int(tty), regexp=regexp, timeout=timeout)

    def dump_tty_contents(self, tty: str) -> None:
        self.execute(f"fold -w 80 /dev/vcs{tty} | systemd-cat")

    def screenshot(self, filename: str) -> None:
        self._call("screenshot", filename=filename)

    def get_screen_text(self) -> str:
        raise MachineError("OCR is not available in this version of attest")

    def get_screen_text_variants(self) -> List[str]:
        raise MachineError("OCR is not available in this version of attest")

    def wait_for_text(self, regex: str, timeout: int = 900) -> None:
        raise MachineError("OCR is not available in this version of attest")

    def send_key(self, key: str, delay: Optional[float] = 0.01, log: Optional[bool] = True) -> None:
        self._call("send_key", key=key)
        if delay:
            time.sleep(delay)

    def send_chars(self, chars: str, delay: Optional[float] = 0.01) -> None:
        self._call("send_chars", chars=chars)

    def send_console(self, chars: str) -> None:
        self._call("send_console", chars=chars)

    # Snapshots (attest's own: the NixOS driver has none).
    def snapshot(self, name: str) -> None:
        """Saves the running machine (memory, devices, disks) as snapshot `name`; it runs on."""
        self._call("snapshot", name=name)

    def restore(self, name: str) -> None:
        """Puts the machine back as it was at snapshot `name`; the shell works at once."""
        self._call("restore", name=name)

    # The serial console, for guests without a backdoor (attest's own).
    def login(self, user: str, password: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """Logs in at the serial console's getty (or accepts an autologin as `user`)."""
        self._call("login", user=user, password=password, timeout=timeout)

    def become_root(self, password: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """`sudo -i` on the serial console, typing `password` if sudo asks for it."""
        self._call("become_root", password=password, timeout=timeout)

    def serial_execute(self, command: str, timeout: Optional[float] = None) -> Tuple[int, str]:
        """Runs `command` in the serial console's shell: (exit status, output)."""
        status, output = self._call("serial_execute", command=command, timeout=timeout)
        return status, output

    def serial_succeed(self, command: str, timeout: Optional[float] = None) -> str:
        return self._call("serial_succeed", command=command, timeout=timeout)

    def check_conditions(self, check: bool = True) -> Dict[str, Any]:
        """Checks the conditions the machine's definition declares, all of them, and returns the
        report (as `attest run` writes it in conditions.json); raises with the table and the
        evidence when one does not hold, unless `check` is False."""
        result = self._call("check_conditions")
        if check and not result["passed"]:
            raise RequestedAssertionFailed(f"{self.name}: conditions failed\n{result['text']}")
        return result["report"]

    def send_monitor_command(self, command: str) -> str:
        return self._call("send_monitor_command", command=command)

    def wait_for_qmp_event(self, event_filter: Callable[[Dict[str, Any]], bool], timeout: int = 60 * 10) -> Dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RequestedAssertionFailed(f"no QMP event matched within {timeout} seconds")
            event = self._call("next_qmp_event", timeout=left)
            if event_filter(event):
                return event

    # Lifecycle.
    def start(self, allow_reboot: bool = False) -> None:
        self._call("start", allow_reboot=allow_reboot)

    def connect(self) -> None:
        self._call("connect")

    def is_up(self) -> bool:
        return self._call("is_up")

    def shutdown(self) -> None:
        self._call("shutdown")

    def crash(self) -> None:
        self._call("crash")

    def reboot(self) -> None:
        self._call("reboot")

    def wait_for_shutdown(self) -> None:
        self._call("wait_for_shutdown")

    def release(self) -> None:
        self._call("crash")

    # Files.
    def copy_from_host(self, source: str, target: str) -> None:
        self._call("copy_from_host", source=str(source), target=target)

    def copy_from_host_via_shell(self, source: str, target: str) -> None:
        self._call("copy_from_host_via_shell", source=str(source), target=target)

    def copy_from_machine(self, source: str, target_dir: str = "") -> None:
        self._call("copy_from_machine", source=source, target_dir=target_dir)

    def copy_from_vm(self, source: str, target_dir: str = "") -> None:
        self._call("copy_from_machine", source=source, target_dir=target_dir)

    # Networks.
    def block(self, vlan: Optional[int] = None) -> None:
        """Takes down the machine's VLAN links (all, or `vlan`'s); its user-mode card stays up."""
        self._call("block", vlan=vlan)

    def unblock(self, vlan: Optional[int] = None) -> None:
        self._call("unblock", vlan=vlan)

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        """Forwards the host's 127.0.0.1:host_port to the guest's guest_port."""
        self._call("forward_port", host_port=host_port, guest_port=guest_port)

    # Interactive.
    def shell_interact(self, address: Optional[str] = None) -> None:
        """Connects the terminal to the machine's root shell: each line read runs as a command."""
        if address is not None:
            raise MachineError("shell_interact(address=...) is not supported: attest connects the terminal itself")
        print(f"{self.name}: root shell; each line runs as a command, Ctrl-D ends", file=sys.stderr)
        while True:
            try:
                command = input(f"{self.name}# ")
            except EOFError:
                print(file=sys.stderr)
                return
            if command.strip():
                status, output = self.execute(command, timeout=None)
                sys.stdout.write(output)
                if status != 0:
                    print(f"(exit code {status})", file=sys.stderr)

    def console_interact(self) -> None:
        """Types each line read from the terminal into the serial console; its output is logged."""
        print(f"{self.name}: serial console; each line is typed into it, Ctrl-D ends", file=sys.stderr)
        while True:
            try:
                line = input()
            except EOFError:
                return
            self.send_console(line + "\n")

    # Logging.
    def log(self, msg: str) -> None:
        _call(self.name, "log", message=msg)

    @contextlib.contextmanager
    def nested(self, msg: str, attrs: Dict[str, str] = {}) -> Iterator[None]:
        with log.nested(f"{self.name}: {msg}", attrs):
            yield


def retry(fn: Callable, timeout_seconds: int = 900) -> None:
    """Calls fn(False) until it returns true, once a second, then fn(True) once (NixOS's retry)."""
    end = time.monotonic() + timeout_seconds
    while time.monotonic() < end:
        if fn(False):
            return
        time.sleep(1)
    if not fn(True):
        raise RequestedAssertionFailed(f"action timed out after {timeout_seconds} seconds")


class PollingCondition:
    """A condition checked, at most every `seconds_interval`, before each machine call."""

    def __init__(self, condition: Callable[[], Optional[bool]], seconds_interval: float = 2.0, description: Optional[str] = None) -> None:
        self.condition = condition
        self.seconds_interval = seconds_interval
        self.description = description or (condition.__doc__ or condition.__name__).strip()
        self.last_called = float("-inf")
        self.entered = False

    def check(self, force: bool = False) -> bool:
        if self.entered or (not force and time.monotonic() - self.last_called < self.seconds_interval):
            return True
        with log.nested(f"polling condition: {self.description}"):
            self.entered = True
            try:
                result = self.condition()
            except Exception as e:
                log.info(f"condition raised {type(e).__name__}: {e}")
                result = False
            finally:
                self.entered = False
            self.last_called = time.monotonic()
        return result is None or bool(result)

    def maybe_raise(self) -> None:
        if not self.check():
            raise PollingConditionError(f"Polling condition failed: {self.description}")

    def wait(self, timeout: int = 900) -> None:
        with log.nested(f"waiting for polling condition: {self.description}"):
            retry(lambda _last: self.check(force=True), timeout)


def polling_condition(
    fun_: Optional[Callable] = None, *, seconds_interval: float = 2.0, description: Optional[str] = None
) -> Any:
    """NixOS's decorator: `with cond:` checks it before every machine call; `cond.wait()` waits for it."""

    class Poll:
        def __init__(self, fun: Callable) -> None:
            self.condition = PollingCondition(fun, seconds_interval, description)

        def __enter__(self) -> None:
            _Conditions.active.append(self.condition)

        def __exit__(self, *_exc: Any) -> None:
            _Conditions.active.remove(self.condition)

        def __call__(self) -> Any:
            return self.condition.condition()

        def wait(self, timeout: int = 900) -> None:
            self.condition.wait(timeout)

    if fun_ is None:
        return Poll
    return Poll(fun_)


class _Log:
    """The driver's log: messages and nested blocks go to attest's log, with their durations."""

    def info(self, *args: Any, **_kwargs: Any) -> None:
        _call(None, "log", message=" ".join(str(a) for a in args))

    log = info
    warning = info

    def error(self, *args: Any, **_kwargs: Any) -> None:
        _call(None, "log", message="!!! " + " ".join(str(a) for a in args))

    @contextlib.contextmanager
    def nested(self, message: str, attrs: Dict[str, str] = {}) -> Iterator[None]:
        _call(None, "block_begin", message=message)
        try:
            yield
        finally:
            _call(None, "block_end", message=message)


log = _Log()


@contextlib.contextmanager
def subtest(name: str) -> Iterator[None]:
    """A named part of the test: logged as a block, one JUnit case."""
    _call(None, "subtest_begin", name=name)
    try:
        yield
    except BaseException as e:
        _call(None, "subtest_end", name=name, failure=f"{type(e).__name__}: {e}")
        raise
    _call(None, "subtest_end", name=name, failure=None)


class _TestCase(unittest.TestCase):
    failureException = RequestedAssertionFailed

    def runTest(self) -> None:
        pass


t = _TestCase()


def start_all() -> None:
    _call(None, "start_all")


def join_all() -> None:
    _call(None, "join_all")


def serial_stdout_on() -> None:
    _call(None, "serial_stdout", on=True)


def serial_stdout_off() -> None:
    _call(None, "serial_stdout", on=False)


_machines: List[Machine] = []


def create_machine(start_command: str, *, name: Optional[str] = None, keep_machine_state: bool = False) -> Machine:
    """A further machine from a NixOS start script (`run-NAME-vm`); it boots when started."""
    machine = Machine(_call(None, "create_machine", start_command=str(start_command), name=name))
    _machines.append(machine)
    return machine


class Driver:
    """What `driver` offers a script: its machines and the same functions as the globals."""

    def __init__(self, machines: List[Machine]) -> None:
        self.machines = machines

    start_all = staticmethod(start_all)
    join_all = staticmethod(join_all)
    subtest = staticmethod(subtest)
    polling_condition = staticmethod(polling_condition)
    serial_stdout_on = staticmethod(serial_stdout_on)
    serial_stdout_off = staticmethod(serial_stdout_off)


class VLan:
    """A VLAN of the test (NixOS's `VLan`): its number, and its switch's socket directory (None in
    TAP mode)."""

    def __init__(self, nr: int, socket_dir: Optional[str]) -> None:
        self.nr = nr
        self.socket_dir = socket_dir

    def __repr__(self) -> str:
        return f"<Vlan Nr. {self.nr}>"


def pythonize_name(name: str) -> str:
    """A machine name as a Python identifier, as NixOS makes it."""
    import re

    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


def test_symbols() -> Dict[str, Any]:
    """The globals of a test script."""
    _machines[:] = [Machine(name) for name in _call(None, "machines")]
    machines = _machines
    vlans = [VLan(v["nr"], v["socket_dir"]) for v in _call(None, "vlans")]
    symbols: Dict[str, Any] = {
        "start_all": start_all,
        "join_all": join_all,
        "subtest": subtest,
        "retry": retry,
        "polling_condition": polling_condition,
        "serial_stdout_on": serial_stdout_on,
        "serial_stdout_off": serial_stdout_off,
        "create_machine": create_machine,
        "log": log,
        "t": t,
        "os": os,
        "machines": machines,
        "machines_qemu": machines,
        "vlans": vlans,
        "driver": Driver(machines),
        "Machine": Machine,
        "BaseMachine": Machine,
        "RequestedAssertionFailed": RequestedAssertionFailed,
    }
    for vlan in vlans:
        symbols[f"vlan{vlan.nr}"] = vlan
    for machine in machines:
        symbols[pythonize_name(machine.name)] = machine
    if len(machines) == 1:
        symbols["machine"] = machines[0]
    return symbols


def report(error: BaseException, script: str) -> None:
    """NixOS's failure report: the script's own frames with their source lines, then the error."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == script]
    if isinstance(error, SyntaxError) and error.filename == script:
        print(f'  File "{script}", line {error.lineno}', file=sys.stderr)
        print(f"    {(error.text or '').strip()}", file=sys.stderr)
    elif frames:
        print("Traceback (most recent call last):", file=sys.stderr)
        print("".join(traceback.format_list(frames)), end="", file=sys.stderr)
    print(f"!!! {type(error).__name__}: {error}", file=sys.stderr)


def run_script(script: str, symbols: Dict[str, Any]) -> int:
    """Runs the script with `symbols` as its globals; reports a failure as NixOS does."""
    with open(script) as f:
        source = f.read()
    try:
        exec(compile(source, script, "exec"), symbols)
    except KeyboardInterrupt as e:
        report(e, script)
        return 130
    except BaseException as e:
        report(e, script)
        return 1
    return 0


def interact(script: str, symbols: Dict[str, Any]) -> int:
    """NixOS's interactive mode: a Python REPL with the script's globals, `test_script()` to run
    the script, and history kept in `.nixos-test-history`."""
    import code

    symbols["test_script"] = lambda: run_script(script, symbols)
    try:
        import readline

        history = os.path.abspath(".nixos-test-history")
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
        readline.parse_and_bind("tab: complete")
    except ImportError:
        history = None
    banner = "attest interactive test driver: the test's globals are here; test_script() runs the script"
    try:
        code.interact(banner=banner, local=symbols, exitmsg="")
    except SystemExit:
        pass  # exit() in the REPL
    finally:
        if history is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(history)
    return 0


def main() -> int:
    interactive = "--interactive" in sys.argv[1:]
    script = [arg for arg in sys.argv[1:] if arg != "--interactive"][0]
    symbols = test_symbols()
    return interact(script, symbols) if interactive else run_script(script, symbols)


if __name__ == "__main__":
    sys.exit(main())
