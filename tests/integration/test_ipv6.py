#!/usr/bin/env python3
"""IPv6: a listener on ::1 and backends on ::1 (mixed with IPv4 on either side)."""

import hashlib
import os
import socket
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import TestCase, ipv6_available, main, make_config, server_of  # noqa: E402


@unittest.skipUnless(ipv6_available(), "no IPv6 loopback on this machine")
class Ipv6Test(TestCase):

    def transaction(self, port, host, expect_server):
        c = self.client(port, host)
        self.assertEqual(server_of(c.greeting()), expect_server)
        body = b"Subject: v6\r\n\r\nhello over " + host.encode() + b"\r\n"
        self.assertTrue(c.send_message(body).startswith(b"250 "))
        label = c.label()
        self.assertEqual(c.quit(), b"221 2.0.0 Bye\r\n")
        return label, hashlib.sha256(body).hexdigest()

    def test_ipv6_listener_and_backend(self):
        srv = self.fake("six", host="::1")
        extra = '\n[listener.v4]\naddress = "127.0.0.1"\nport = 0\npool = "p"\n'
        lb = self.smtplb(make_config([srv], listener={"address": "::1"}, extra=extra), up=["p/six"])
        self.assertEqual(lb.addresses["mx"], "::1")
        self.assertRegex(lb.log(), r"listener mx listening on \[::1\]:%d for pool p" % lb.port("mx"))
        self.assertEqual(srv.checks()[0].commands[0], "EHLO hc.smtplb.test")

        label6, h6 = self.transaction(lb.port("mx"), "::1", "six")
        self.assertTrue(label6.startswith("[::1]:"))
        a = lb.wait_access(client=label6)[0]
        self.assertEqual((a["listener"], a["server"], a["term"]), ("mx", "six", "--"))

        label4, h4 = self.transaction(lb.port("v4"), "127.0.0.1", "six")
        a = lb.wait_access(client=label4)[0]
        self.assertEqual((a["listener"], a["server"], a["term"]), ("v4", "six", "--"))

        self.assertEqual([m["sha256"] for m in srv.wait_messages(2)], [h6, h4])

    def test_ipv6_listener_ipv4_backend(self):
        srv = self.fake("four")
        lb = self.smtplb(make_config([srv], listener={"address": "::1"}), up=["p/four"])
        label, h = self.transaction(lb.port(), "::1", "four")
        lb.wait_access(client=label, server="four", term="--")
        self.assertEqual(srv.wait_messages(1)[0]["sha256"], h)

    def test_ipv6_listener_is_v6_only(self):
        """A listener on ::1 does not also take IPv4 (one listener per address family)."""
        srv = self.fake("four")
        lb = self.smtplb(make_config([srv], listener={"address": "::1"}), up=["p/four"])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            with self.assertRaises(ConnectionRefusedError):
                s.connect(("127.0.0.1", lb.port()))


if __name__ == "__main__":
    main()
