#!/usr/bin/env python3
"""ha_load: starts one SMTP session every INTERVAL seconds against HOST:PORT, whatever
the earlier ones are doing, and writes one JSON line per finished session to --out.

Used by test_ha_pair.py inside the client's network namespace: a steady stream of new
sessions, each sending one message, so that a failover shows as the sessions it broke and
the gap before new ones succeed again. --chunks N --chunk-delay S sends the message body
in N pieces S seconds apart, so that sessions stay open across a planned switch.

A line: {"id", "port" (client's local port), "start", "connected", "greeting", "end"
(Unix times; null when not reached), "class", "detail"}. Classes:
  ok            250 after the final dot and 221 after QUIT
  refused       connect() refused or reset (RST to the SYN)
  connect_timeout  no connection within --timeout
  bad_greeting  a greeting other than 220 (a balancer's own 421, say)
  reset         the connection was reset after it was established
  eof           the server closed before the dialogue ended
  timeout       a reply did not come within --timeout
  rejected      a 4xx/5xx reply to a command
  error         anything else
Runs until --duration passes, --sessions have started or it gets SIGTERM; then it starts no
new session, waits for the open ones (each bounded by --timeout per step) and exits 0.
--source-port P binds the client's port (one session, to repeat a 4-tuple). Standard
library only.
"""

import argparse
import asyncio
import json
import signal
import socket
import sys
import time


class Failed(Exception):
    def __init__(self, cls, detail):
        super().__init__(detail)
        self.cls = cls
        self.detail = detail


async def reply(reader, timeout, what="the greeting"):
    """One whole (multi-line) reply to `what`: (code, text)."""
    lines = []
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise Failed("timeout", "no reply to %s within %.1fs (%r)" % (what, timeout, b"".join(lines)[:80]))
        except ConnectionResetError:
            raise Failed("reset", "reset while waiting for the reply to %s" % what)
        if not line.endswith(b"\n"):
            raise Failed("eof", "closed while waiting for the reply to %s (%r)" % (what, line[:80]))
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    text = b"".join(lines)
    try:
        return int(text[:3]), text
    except ValueError:
        raise Failed("error", "malformed reply %r" % text[:80])


async def session(args, sid, out):
    rec = {"id": sid, "port": None, "start": time.time(), "connected": None, "greeting": None, "end": None,
           "class": "ok", "detail": ""}
    writer = None
    try:
        try:
            if args.source_port:
                # One session from a fixed port (the same 4-tuple as an earlier session).
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", args.source_port))
                sock.setblocking(False)
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (args.host, args.port)),
                                       args.timeout)
                reader, writer = await asyncio.open_connection(sock=sock)
            else:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(args.host, args.port), args.timeout)
        except asyncio.TimeoutError:
            raise Failed("connect_timeout", "no connection within %.1fs" % args.timeout)
        except ConnectionRefusedError:
            raise Failed("refused", "connection refused")
        except ConnectionResetError:
            raise Failed("refused", "reset during the connect")
        except OSError as e:
            raise Failed("error", "connect: %s" % e)
        rec["connected"] = time.time()
        rec["port"] = writer.get_extra_info("sockname")[1]
        code, text = await reply(reader, args.timeout)
        rec["greeting"] = time.time()
        if code != 220:
            raise Failed("bad_greeting", text.decode("utf-8", "replace").strip()[:120])

        async def cmd(line, want):
            writer.write(line)
            await writer.drain()
            c, t = await reply(reader, args.timeout, "the final dot" if line == b".\r\n" else line.strip().decode())
            if c != want:
                raise Failed("rejected", "%r -> %r" % (line.strip()[:40], t.strip()[:120]))

        await cmd(b"EHLO ha-load.example\r\n", 250)
        await cmd(b"MAIL FROM:<load@example.org>\r\n", 250)
        await cmd(b"RCPT TO:<sink@example.net>\r\n", 250)
        await cmd(b"DATA\r\n", 354)
        writer.write(b"Subject: ha_load %d\r\n\r\n" % sid)
        for i in range(args.chunks):
            writer.write(b"line %d of session %d\r\n" % (i, sid))
            try:
                await writer.drain()
            except ConnectionResetError:
                raise Failed("reset", "reset while sending piece %d of the body" % i)
            if args.chunk_delay:
                await asyncio.sleep(args.chunk_delay)
        await cmd(b".\r\n", 250)
        await cmd(b"QUIT\r\n", 221)
    except Failed as f:
        rec["class"], rec["detail"] = f.cls, f.detail
    except ConnectionResetError:
        rec["class"], rec["detail"] = "reset", "reset while sending a command"
    except (BrokenPipeError, ConnectionError) as e:
        rec["class"], rec["detail"] = "reset", "while sending: %s" % e
    except OSError as e:
        rec["class"], rec["detail"] = "error", str(e)
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1)
            except (asyncio.TimeoutError, OSError):
                pass
        rec["end"] = time.time()
        out.write(json.dumps(rec) + "\n")
        out.flush()


async def main_async(args):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = set()
    with open(args.out, "w") as out:
        t0 = time.monotonic()
        sid = 0
        while not stop.is_set() and time.monotonic() - t0 < args.duration and sid < args.sessions:
            t = asyncio.ensure_future(session(args, sid, out))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            sid += 1
            # Start times stay on the grid even when the loop is late.
            delay = t0 + sid * args.interval - time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, delay))
            except asyncio.TimeoutError:
                pass
        if tasks:
            await asyncio.wait(tasks)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("--out", required=True, help="JSON lines, one per finished session")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between session starts (0.02)")
    ap.add_argument("--duration", type=float, default=60.0, help="stop starting sessions after this (60 s)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per connect and per reply (5 s)")
    ap.add_argument("--sessions", type=int, default=1 << 30, help="stop after starting this many")
    ap.add_argument("--source-port", type=int, default=0, help="bind this local port (with --sessions 1)")
    ap.add_argument("--chunks", type=int, default=1, help="body pieces (1)")
    ap.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between body pieces (0)")
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    args.host, args.port = host, int(port)
    socket.setdefaulttimeout(args.timeout)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
