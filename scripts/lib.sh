# Shared by the demo and benchmark scripts (source it): a private temp dir removed on exit, and
# private servers on Unix sockets / free loopback ports under it, stopped on exit.
qd_init() {
  T=$(mktemp -d "/tmp/${1:-quotad}.XXXXXX")
  pids=()
  trap qd_cleanup EXIT
}
qd_cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$T"
}
# Wait until a RESP server answers PING on a Unix socket.
qd_wait_sock() {
  for _ in $(seq 100); do redis-cli -s "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "nothing answers on $1" >&2
  return 1
}
# A private redis-server on $T/redis.sock, durable as quotad requires (AOF, fsync always).
qd_start_redis() {
  redis-server --port 0 --unixsocket "$T/redis.sock" --save "" --appendonly yes --appendfsync always --dir "$T" --logfile "$T/redis.log" &
  pids+=($!)
  qd_wait_sock "$T/redis.sock"
}
# A sidecar's config on the private redis-server (region sg): $T/NAME.yaml, serving on $T/NAME.sock,
# host id NAME, log level warning. Each further argument is one more YAML line (empty ones are left out).
#   qd_sidecar_yaml q none "journal: { dir: $T/journal }"
qd_sidecar_yaml() {
  local name=$1 mode=$2 line
  shift 2
  {
    printf 'host_id: %s\nregion: sg\nregions:\n  sg: { redis: "unix://%s/redis.sock" }\n' "$name" "$T"
    printf 'socket: { path: %s/%s.sock }\ndurability: %s\nlog_level: warning\n' "$T" "$name" "$mode"
    for line in "$@"; do
      if [ -n "$line" ]; then printf '%s\n' "$line"; fi
    done
  } > "$T/$name.yaml"
}
# A private Tansu broker on a free loopback port: sets KPORT (needs scripts/kafka-env.sh sourced).
qd_start_tansu() {
  KPORT=$(qd_free_port)
  "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$KPORT" --advertised-listener-url "tcp://127.0.0.1:$KPORT" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$KPORT") 2>/dev/null && return 0; sleep 0.1; done
  echo "Tansu did not start on port $KPORT" >&2
  return 1
}
# A private Redis Cluster of $1 masters with $2 replicas each (durable, on free loopback ports, node
# timeout 2 s): sets nodes (HOST:PORT each) and CLUSTER (a redis-cluster:// URL naming every node).
qd_start_cluster() {
  local masters=$1 replicas=$2 total=$(($1 * (1 + $2))) p b i n ok
  nodes=()
  for i in $(seq 0 $((total - 1))); do
    p=$(qd_free_port); b=$(qd_free_port); mkdir -p "$T/n$i"
    redis-server --port "$p" --bind 127.0.0.1 --dir "$T/n$i" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-port "$b" --cluster-node-timeout 2000 --appendonly yes --appendfsync always --save "" \
      --logfile "$T/n$i/redis.log" &
    pids+=($!)
    nodes+=("127.0.0.1:$p")
  done
  for n in "${nodes[@]}"; do
    for _ in $(seq 100); do redis-cli -h "${n%:*}" -p "${n#*:}" ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas "$replicas" --cluster-yes >"$T/cluster-create.log"
  for _ in $(seq 300); do
    ok=0
    for n in "${nodes[@]}"; do
      redis-cli -h "${n%:*}" -p "${n#*:}" cluster info 2>/dev/null | grep -q cluster_state:ok && ok=$((ok + 1))
    done
    [ "$ok" = "$total" ] && break
    sleep 0.1
  done
  CLUSTER="redis-cluster://$(IFS=,; echo "${nodes[*]}")"
}
# A free loopback TCP port.
qd_free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
