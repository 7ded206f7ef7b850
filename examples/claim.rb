#!/usr/bin/env ruby
# Claim a voucher from quotad with ruby-redis (gem redis, or Debian's ruby-redis), default settings.
# usage: claim.rb SOCKET VOUCHER USER
require "redis"
require "securerandom"

sock, voucher, user = ARGV
r = Redis.new(path: sock)
req = SecureRandom.uuid # one per logical claim: every retry sends the same one
begin
  attempts ||= 0
  puts "claimed: #{r.call('CLAIM', voucher, user, 'REQ', req)}"
rescue Redis::CommandError => e
  code = e.message.split(" ", 2).first
  if %w[UNAVAILABLE BUSY].include?(code) && (attempts += 1) < 5
    sleep(0.05 * 2**attempts)
    retry
  end
  puts "refused: #{e.message}" # SOLDOUT, USERLIMIT, INACTIVE, NOVOUCHER are final
  exit 1
end
