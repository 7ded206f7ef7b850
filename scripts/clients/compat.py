#!/usr/bin/env python3
"""redis-py against a running quotad: every way an app would use it, with the client's default settings.

usage: compat.py SOCKET VOUCHER SOLDOUT_VOUCHER [PASSWORD]
VOUCHER must have stock (and no per-user limit); SOLDOUT_VOUCHER must have a limit of 0.
Exits 0 when every check passes; prints each failure otherwise.
"""
import asyncio
import sys
import uuid

import redis
import redis.asyncio

SOCK, V, EMPTY = sys.argv[1:4]
PASSWORD = sys.argv[4] if len(sys.argv) > 4 else None
failures = []


def check(what, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + what + ("" if ok else f": {detail}"))
    if not ok:
        failures.append(what)


def client(**kw):
    if PASSWORD is not None:
        kw.setdefault("password", PASSWORD)
    return redis.Redis(unix_socket_path=SOCK, **kw)


def req():
    return "req-" + uuid.uuid4().hex


def claim(r, voucher, user, rid=None):
    return r.execute_command("CLAIM", voucher, user, "REQ", rid or req())


print(f"redis-py {redis.__version__}, hiredis: {redis.utils.HIREDIS_AVAILABLE}")
r = client()

# Connecting with the defaults (redis-py >= 6 sends HELLO 3 and CLIENT SETINFO) and claiming.
cid = claim(r, V, "py-1")
check("CLAIM returns a claim id", isinstance(cid, bytes) and cid.count(b".") >= 3, repr(cid))
rid = req()
check("CLAIM with the same REQ returns the same claim id", claim(r, V, "py-2", rid) == claim(r, V, "py-2", rid))
check("PING", r.ping() is True)
check("ECHO", r.echo("hi") == b"hi")
check("DBSIZE", isinstance(r.dbsize(), int))
check("AVAIL is an integer", isinstance(r.execute_command("AVAIL", V), int))

# Errors are exceptions whose message starts with the code.
try:
    claim(r, EMPTY, "py-3")
    check("SOLDOUT raises", False, "no exception")
except redis.exceptions.ResponseError as e:
    check("SOLDOUT raises ResponseError with the code", str(e).startswith("SOLDOUT"), str(e))
try:
    r.execute_command("CLAIM", "no-such-voucher", "u", "REQ", req())
    check("NOVOUCHER raises", False, "no exception")
except redis.exceptions.ResponseError as e:
    check("NOVOUCHER raises ResponseError with the code", str(e).startswith("NOVOUCHER"), str(e))
try:
    r.execute_command("CLAIM", V)
    check("bad arity raises", False, "no exception")
except redis.exceptions.ResponseError as e:
    check("bad arity raises ResponseError", "wrong number of arguments" in str(e), str(e))

# Pipelines: non-transactional, and transactional (redis-py's default): every claim's id comes back.
p = r.pipeline(transaction=False)
for i in range(10):
    p.execute_command("CLAIM", V, f"pipe-{i}", "REQ", req())
ids = p.execute()
check("pipeline(transaction=False) returns 10 claim ids", len(ids) == 10 and all(isinstance(x, bytes) for x in ids), ids)
p = r.pipeline()
for i in range(5):
    p.execute_command("CLAIM", V, f"multi-{i}", "REQ", req())
ids = p.execute()
check("pipeline() (MULTI/EXEC) returns 5 claim ids", len(ids) == 5 and all(isinstance(x, bytes) for x in ids), ids)
check("claim ids are distinct", len(set(ids)) == 5, ids)
p = r.pipeline()
p.execute_command("CLAIM", V, "multi-x", "REQ", req())
p.execute_command("NOSUCHCOMMAND")
try:
    p.execute()
    check("a transaction with an unknown command is refused", False, "no exception")
except redis.exceptions.ResponseError as e:
    check("a transaction with an unknown command is discarded (EXECABORT)", "EXECABORT" in str(e) or "unknown command" in str(e), str(e))

# INFO parses into a dict that keeps every voucher.
info = r.info()
check("INFO parses", "claims_ok" in info and "connected_clients" in info, list(info)[:10])
vouchers = [v for k, v in info.items() if k.startswith("voucher") and isinstance(v, dict)]
check("INFO keeps each voucher line as a dict", any(v.get("id") == V for v in vouchers), vouchers)
check("INFO keyspace", isinstance(info.get("db0"), dict), info.get("db0"))

# Connection options that send commands while connecting.
for kw in ({"db": 0}, {"client_name": "my-app"}, {"password": PASSWORD or "anything"}, {"protocol": 2}, {"protocol": 3}):
    try:
        c = client(**kw)
        check(f"connect with {kw}", isinstance(claim(c, V, "opt"), bytes))
        if "client_name" in kw:
            check("CLIENT GETNAME", c.client_getname() == "my-app" or c.client_getname() == b"my-app", c.client_getname())
        c.close()
    except Exception as e:  # noqa: BLE001
        check(f"connect with {kw}", False, repr(e))
try:
    client(db=1).execute_command("CLAIM", V, "db1", "REQ", req())
    check("db=1 is refused", False, "no exception")
except redis.exceptions.ResponseError as e:
    check("db=1 is refused with a clear error", "DB index is out of range" in str(e), str(e))

# A pool shared by threads.
import concurrent.futures

pool = redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=SOCK, max_connections=8,
                            password=PASSWORD)
pr = redis.Redis(connection_pool=pool)
with concurrent.futures.ThreadPoolExecutor(8) as ex:
    got = list(ex.map(lambda i: claim(pr, V, f"pool-{i}"), range(40)))
check("40 claims over a pool of 8 connections", len(set(got)) == 40, got[:3])


# asyncio.
async def run_async():
    ar = redis.asyncio.Redis(unix_socket_path=SOCK, password=PASSWORD)
    ids = await asyncio.gather(*(ar.execute_command("CLAIM", V, f"aio-{i}", "REQ", req()) for i in range(20)))
    async with ar.pipeline() as ap:
        for i in range(3):
            ap.execute_command("CLAIM", V, f"aio-multi-{i}", "REQ", req())
        more = await ap.execute()
    await ar.aclose() if hasattr(ar, "aclose") else await ar.close()
    return ids, more


ids, more = asyncio.run(run_async())
check("asyncio: 20 concurrent claims", len(set(ids)) == 20, ids[:3])
check("asyncio: transactional pipeline", len(more) == 3 and all(isinstance(x, bytes) for x in more), more)

if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("all checks passed")
