#!/usr/bin/env python3
"""Claim a voucher from quotad with redis-py (`pip install redis`), default settings.

usage: claim.py SOCKET VOUCHER USER

    import redis, uuid
    r = redis.Redis(unix_socket_path="/run/quotad/quotad.sock")
    claim_id = r.execute_command("CLAIM", "flash-sale", "user-42", "REQ", str(uuid.uuid4()))

Send one REQ per logical claim and the same REQ on every retry: quotad then answers a retry with the
first attempt's claim id instead of granting a second claim. SOLDOUT, USERLIMIT, INACTIVE and NOVOUCHER
are final; UNAVAILABLE and BUSY (and a lost connection) are worth a retry with the same REQ.
"""
import sys
import time
import uuid

import redis

FINAL = {"SOLDOUT", "USERLIMIT", "INACTIVE", "NOVOUCHER", "NOPERM", "ERR"}


def claim(r, voucher, user, attempts=5):
    request_id = str(uuid.uuid4())  # one per logical claim: every retry sends the same one
    for attempt in range(attempts):
        try:
            return r.execute_command("CLAIM", voucher, user, "REQ", request_id).decode()
        except redis.exceptions.ResponseError as e:
            if str(e).split(" ", 1)[0] in FINAL:
                raise
        except redis.exceptions.ConnectionError:
            pass
        time.sleep(0.05 * 2**attempt)  # UNAVAILABLE, BUSY, or no connection: back off, same REQ
    raise RuntimeError("quotad unavailable, try again later")


if __name__ == "__main__":
    sock, voucher, user = sys.argv[1:4]
    try:
        print("claimed:", claim(redis.Redis(unix_socket_path=sock), voucher, user))
    except redis.exceptions.ResponseError as e:
        print("refused:", e)  # e.g. "SOLDOUT voucher sold out in this region"
        sys.exit(1)
