#!/usr/bin/env node
// Claim a voucher from quotad with node-redis (npm redis, or Debian's node-redis), default settings.
// usage: claim.js SOCKET VOUCHER USER
const { createClient } = require("redis");
const { randomUUID } = require("crypto");

async function main() {
  const [sock, voucher, user] = process.argv.slice(2);
  const client = createClient({ socket: { path: sock } });
  await client.connect();
  const req = randomUUID(); // one per logical claim: every retry sends the same one
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      console.log("claimed: " + (await client.sendCommand(["CLAIM", voucher, user, "REQ", req])));
      return client.quit();
    } catch (e) {
      const code = String(e.message).split(" ")[0];
      if (code !== "UNAVAILABLE" && code !== "BUSY") {
        console.log("refused: " + e.message); // SOLDOUT, USERLIMIT, INACTIVE, NOVOUCHER are final
        await client.quit();
        process.exit(1);
      }
      await new Promise((r) => setTimeout(r, 50 * 2 ** attempt));
    }
  }
  console.log("refused: quotad unavailable, try again later");
  await client.quit();
  process.exit(1);
}
main();
