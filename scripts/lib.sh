# Shared by scripts/run, scripts/test and scripts/bench: find PostgreSQL and RabbitMQ
# (DATABASE_URL / AMQP_URL, else the defaults), start them with docker compose when a
# Docker engine is there and they are not, otherwise stop with a clear message.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orderflow}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# host and port of a URL such as scheme://user:pw@host:port/path
url_host() { local a="${1#*://}"; a="${a%%/*}"; a="${a##*@}"; echo "${a%%:*}"; }
url_port() { local a="${1#*://}"; a="${a%%/*}"; a="${a##*@}"; [[ "$a" == *:* ]] && echo "${a##*:}" || echo "$2"; }

reachable() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

docker_engine() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

wait_for() { # name host port seconds
  local i
  for ((i = 0; i < $4 * 2; i++)); do reachable "$2" "$3" && return 0; sleep 0.5; done
  die "$1 did not come up at $2:$3 within $4 s"
}

ensure_services() {
  local pg_host pg_port mq_host mq_port missing=()
  pg_host=$(url_host "$DATABASE_URL"); pg_port=$(url_port "$DATABASE_URL" 5432)
  mq_host=$(url_host "$AMQP_URL"); mq_port=$(url_port "$AMQP_URL" 5672)
  reachable "$pg_host" "$pg_port" || missing+=("PostgreSQL at $pg_host:$pg_port (DATABASE_URL)")
  reachable "$mq_host" "$mq_port" || missing+=("RabbitMQ at $mq_host:$mq_port (AMQP_URL)")
  [ ${#missing[@]} -eq 0 ] && return 0
  if docker_engine; then
    say "starting PostgreSQL and RabbitMQ with docker compose"
    docker compose -f "$ROOT/docker-compose.yml" up -d --wait
    wait_for PostgreSQL "$pg_host" "$pg_port" 60
    wait_for RabbitMQ "$mq_host" "$mq_port" 90
    return 0
  fi
  die "cannot reach ${missing[*]}; start them, point DATABASE_URL / AMQP_URL at them, or install Docker so that docker-compose.yml can start them"
}

need_cargo() {
  command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust (https://rustup.rs) first"
}
