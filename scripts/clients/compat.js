#!/usr/bin/env node
// node-redis against a running quotad, with the client's defaults.
// usage: compat.js SOCKET VOUCHER SOLDOUT_VOUCHER
const { createClient } = require("redis");
const crypto = require("crypto");
const [sock, v, empty] = process.argv.slice(2);
let failures = 0;
function check(what, ok, detail = "") {
  console.log((ok ? "ok   " : "FAIL ") + what + (ok ? "" : `: ${detail}`));
  if (!ok) failures++;
}
const req = () => "req-" + crypto.randomBytes(8).toString("hex");

(async () => {
  console.log("node-redis " + require("redis/package.json").version);
  const c = createClient({ socket: { path: sock, reconnectStrategy: false } });
  c.on("error", (e) => console.log("client error: " + e));
  await c.connect();
  const id = await c.sendCommand(["CLAIM", v, "js-1", "REQ", req()]);
  check("CLAIM returns a claim id", typeof id === "string" && id.split(".").length >= 4, id);
  try {
    await c.sendCommand(["CLAIM", empty, "js-2", "REQ", req()]);
    check("SOLDOUT rejects", false, "no error");
  } catch (e) {
    check("SOLDOUT rejects with the code", String(e.message).startsWith("SOLDOUT"), e.message);
  }
  const ids = await Promise.all([...Array(20).keys()].map((i) => c.sendCommand(["CLAIM", v, `js-p-${i}`, "REQ", req()])));
  check("20 concurrent (auto-pipelined) claims", new Set(ids).size === 20, ids.slice(0, 3));
  const multi = await c.multi().addCommand(["CLAIM", v, "js-m-1", "REQ", req()]).addCommand(["CLAIM", v, "js-m-2", "REQ", req()]).exec();
  check("multi/exec: 2 claim ids", Array.isArray(multi) && multi.length === 2 && multi.every((x) => typeof x === "string"), JSON.stringify(multi));
  const info = await c.info();
  check("INFO", info.includes("claims_ok:") && info.includes(`id=${v},`), info.slice(0, 80));
  await c.quit();
  // Connection options that send SELECT, AUTH and CLIENT SETNAME while connecting.
  const o = createClient({ socket: { path: sock, reconnectStrategy: false }, database: 0, password: "anything", name: "my-app" });
  o.on("error", (e) => console.log("client error: " + e));
  await o.connect();
  check("connect with database, password and name", typeof (await o.sendCommand(["CLAIM", v, "js-o", "REQ", req()])) === "string");
  check("CLIENT GETNAME", (await o.sendCommand(["CLIENT", "GETNAME"])) === "my-app");
  await o.quit();
  console.log(failures === 0 ? "all checks passed" : `${failures} check(s) failed`);
  process.exit(failures === 0 ? 0 : 1);
})().catch((e) => {
  console.log("FAIL " + e);
  process.exit(1);
});
