"""Unit tests of attest_driver.py that need no driver: the machine API's signatures against the
NixOS driver's, names, retry, polling conditions and the failure report."""

import inspect
import io
import os
import re
import sys
import time
import unittest
from contextlib import redirect_stderr
from unittest import mock

sys.path.insert(0, os.path.dirname(__file__))
import attest_driver  # noqa: E402


def nixos_api():
    """(name, [(parameter, default or inspect._empty, kind)]) for each line of nixos_api.txt."""
    path = os.path.join(os.path.dirname(__file__), "nixos_api.txt")
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, params = re.fullmatch(r"(\w+)\((.*)\)", line).groups()
            parsed = []
            for param in filter(None, (p.strip() for p in params.split(","))):
                if param.startswith("*"):
                    parsed.append((param[1:], inspect.Parameter.empty, inspect.Parameter.VAR_POSITIONAL))
                elif "=" in param:
                    key, default = param.split("=", 1)
                    parsed.append((key, eval(default), None))
                else:
                    parsed.append((param, inspect.Parameter.empty, None))
            yield name, parsed


# attest's additions to NixOS methods: keyword parameters after NixOS's own, with defaults that
# keep NixOS's behaviour, so every NixOS call means the same.
EXTENSIONS = {"block": {"vlan": None}, "unblock": {"vlan": None}}


class MachineApi(unittest.TestCase):
    def test_every_nixos_method_exists_with_its_parameters_and_defaults(self):
        for name, expected in nixos_api():
            with self.subTest(method=name):
                method = getattr(attest_driver.Machine, name, None)
                self.assertIsNotNone(method, f"Machine.{name} is missing")
                params = list(inspect.signature(method).parameters.values())[1:]
                extra = EXTENSIONS.get(name, {})
                own = [p for p in params if p.name not in extra]
                self.assertEqual({p.name: p.default for p in params if p.name in extra}, extra, name)
                self.assertEqual(params[: len(own)], own, f"{name}: attest's parameters come after NixOS's")
                params = own
                self.assertEqual([p.name for p in params], [e[0] for e in expected], name)
                for param, (_, default, kind) in zip(params, expected):
                    self.assertEqual(param.default, default, f"{name}({param.name})")
                    if kind is not None:
                        self.assertEqual(param.kind, kind, f"{name}({param.name})")

    def test_names_become_python_identifiers_as_in_nixos(self):
        self.assertEqual(attest_driver.pythonize_name("server"), "server")
        self.assertEqual(attest_driver.pythonize_name("my-client.1"), "my_client_1")
        self.assertEqual(attest_driver.pythonize_name("1st"), "_st")


class Retry(unittest.TestCase):
    def test_retry_stops_when_the_function_holds_and_fails_with_the_last_call(self):
        calls = []
        attest_driver.retry(lambda last: calls.append(last) or len(calls) == 2, timeout_seconds=5)
        self.assertEqual(calls, [False, False])
        with mock.patch("time.sleep"), mock.patch("time.monotonic", side_effect=[0, 0, 2, 2]):
            with self.assertRaisesRegex(attest_driver.RequestedAssertionFailed, "timed out after 1 seconds"):
                attest_driver.retry(lambda last: False, timeout_seconds=1)


class PollingConditions(unittest.TestCase):
    def setUp(self):
        self.log = mock.patch.object(attest_driver, "_call")
        self.log.start()

    def tearDown(self):
        self.log.stop()
        attest_driver._Conditions.active.clear()

    def test_a_condition_is_checked_before_machine_calls_while_active(self):
        state = {"ok": True}

        @attest_driver.polling_condition(seconds_interval=0)
        def healthy():
            "the service is healthy"
            return state["ok"]

        attest_driver._Conditions.check_all()
        with healthy:
            attest_driver._Conditions.check_all()
            state["ok"] = False
            with self.assertRaisesRegex(attest_driver.PollingConditionError, "the service is healthy"):
                attest_driver._Conditions.check_all()
        attest_driver._Conditions.check_all()

    def test_none_counts_as_holding_and_an_exception_as_failing(self):
        cond = attest_driver.PollingCondition(lambda: None, seconds_interval=0)
        self.assertTrue(cond.check())
        cond = attest_driver.PollingCondition(lambda: 1 / 0, seconds_interval=0, description="divides")
        self.assertFalse(cond.check())


class Report(unittest.TestCase):
    def test_the_report_shows_the_scripts_frames_and_the_message(self):
        script = "/tmp/test-script.py"
        source = "x = 1\nt.assertEqual(x, 2)\n"
        code = compile(source, script, "exec")
        globals_ = {"t": attest_driver.t}
        try:
            exec(code, globals_)
        except BaseException as e:
            error = e
        err = io.StringIO()
        with redirect_stderr(err), mock.patch("linecache.getline", return_value="t.assertEqual(x, 2)\n"):
            attest_driver.report(error, script)
        text = err.getvalue()
        self.assertIn(f'File "{script}", line 2, in <module>', text)
        self.assertIn("!!! RequestedAssertionFailed: 1 != 2", text)
        self.assertNotIn("unittest", text, "only the script's own frames")

    def test_a_syntax_error_names_its_line(self):
        script = "/tmp/broken.py"
        try:
            compile("start_all()\nif True\n", script, "exec")
        except SyntaxError as e:
            error = e
        err = io.StringIO()
        with redirect_stderr(err):
            attest_driver.report(error, script)
        self.assertIn(f'File "{script}", line 2', err.getvalue())
        self.assertIn("!!! SyntaxError", err.getvalue())


if __name__ == "__main__":
    unittest.main()
