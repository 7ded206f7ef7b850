#!/usr/bin/env python3
"""Claim a voucher from quotad with no dependencies: RESP over a Unix socket.

usage: claim.py SOCKET VOUCHER USER [QTY]
Any Redis client works the same way (redis-py: redis.Redis(unix_socket_path=SOCKET).execute_command("CLAIM", ...)).
"""
import socket
import sys


def command(sock, *args):
    frame = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args))
    sock.sendall(frame)
    f = sock.makefile("rb")
    line = f.readline()
    if line[:1] == b"$":
        n = int(line[1:])
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if line[:1] == b"-":
        raise RuntimeError(line[1:].decode().strip())
    return line[1:].decode().strip()


def main():
    path, voucher, user = sys.argv[1:4]
    qty = sys.argv[4] if len(sys.argv) > 4 else "1"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        print("claim id:", command(s, "CLAIM", voucher, user, "QTY", qty))
    except RuntimeError as e:  # SOLDOUT, USERLIMIT, UNAVAILABLE, ...
        print("refused:", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
