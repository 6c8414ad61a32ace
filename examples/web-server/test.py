# A NixOS-style testScript: the same globals and machine API as nixpkgs tests.
start_all()

with subtest("the server starts its web service"):
    server.wait_for_unit("multi-user.target")
    server.succeed("mkdir -p /srv && echo 'hello from attest' > /srv/index.html")
    server.succeed("systemd-run --unit=web python3 -m http.server 80 --directory /srv")
    server.wait_for_unit("web.service")
    server.wait_for_open_port(80)

with subtest("it serves its page"):
    t.assertEqual(server.succeed("curl -sf http://localhost/"), "hello from attest\n")

with subtest("the client reaches it by name over VLAN 1"):
    client.wait_for_unit("multi-user.target")
    t.assertEqual(client.succeed("curl -sf http://server/"), "hello from attest\n")

with subtest("and not while its link is blocked"):
    client.block()
    client.fail("curl -sf --max-time 3 http://server/")
    client.unblock()
    t.assertEqual(client.succeed("curl -sf http://server/"), "hello from attest\n")
