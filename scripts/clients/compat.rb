#!/usr/bin/env ruby
# ruby-redis against a running quotad, with the client's defaults.
# usage: compat.rb SOCKET VOUCHER SOLDOUT_VOUCHER
require "redis"
require "securerandom"

sock, v, empty = ARGV
$failures = 0
def check(what, ok, detail = "")
  puts((ok ? "ok   " : "FAIL ") + what + (ok ? "" : ": #{detail}"))
  $failures += 1 unless ok
end
def req = "req-#{SecureRandom.hex(8)}"

puts "ruby-redis #{Redis::VERSION}"
r = Redis.new(path: sock)
id = r.call("CLAIM", v, "rb-1", "REQ", req)
check("CLAIM returns a claim id", id.is_a?(String) && id.count(".") >= 3, id.inspect)
same = req
check("same REQ, same claim id", r.call("CLAIM", v, "rb-2", "REQ", same) == r.call("CLAIM", v, "rb-2", "REQ", same))
begin
  r.call("CLAIM", empty, "rb-3", "REQ", req)
  check("SOLDOUT raises", false, "no exception")
rescue Redis::CommandError => e
  check("SOLDOUT raises CommandError with the code", e.message.start_with?("SOLDOUT"), e.message)
end
ids = r.pipelined { |p| 5.times { |i| p.call("CLAIM", v, "rb-pipe-#{i}", "REQ", req) } }
check("pipelined: 5 claim ids", ids.size == 5 && ids.all? { |x| x.is_a?(String) }, ids.inspect)
ids = r.multi { |t| 3.times { |i| t.call("CLAIM", v, "rb-multi-#{i}", "REQ", req) } }
check("multi: 3 claim ids", ids.is_a?(Array) && ids.size == 3 && ids.uniq.size == 3, ids.inspect)
info = r.info
check("INFO parses", info.key?("claims_ok"), info.keys.first(5).inspect)
check("INFO keeps each voucher line", info.any? { |k, val| k.start_with?("voucher") && val.to_s.include?("id=#{v}") }, info.select { |k, _| k.start_with?("voucher") }.inspect)
c = Redis.new(path: sock, db: 0, id: "my-app", password: "anything")
check("connect with db, id (CLIENT SETNAME) and password", c.call("CLAIM", v, "rb-opt", "REQ", req).is_a?(String))
check("CLIENT GETNAME", c.call("CLIENT", "GETNAME") == "my-app")
puts($failures.zero? ? "all checks passed" : "#{$failures} check(s) failed")
exit($failures.zero? ? 0 : 1)
