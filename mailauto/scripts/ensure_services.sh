#!/usr/bin/env bash
# Make sure the Postgres and Redis that the test suite needs are up: start them when
# they are installed here but stopped, otherwise say exactly what is missing.
set -u
DATABASE_URL="$1"
REDIS_URL="$2"

pg_host=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or '127.0.0.1', p.port or 5432, p.username or 'postgres', (p.path or '/mailauto')[1:])" "$DATABASE_URL")
read -r PGHOST_ PGPORT_ PGUSER_ PGDB_ <<<"$pg_host"
redis_hp=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p.hostname or '127.0.0.1', p.port or 6379)" "$REDIS_URL")
read -r RHOST RPORT <<<"$redis_hp"

pg_up() { pg_isready -q -h "$PGHOST_" -p "$PGPORT_" 2>/dev/null || python3 - "$PGHOST_" "$PGPORT_" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
PY
}
redis_up() { python3 - "$RHOST" "$RPORT" <<'PY'
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) if True else None
s.sendall(b"PING\r\n"); sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
PY
}

missing=()
if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    echo "Postgres is stopped: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_up && break; sleep 0.5; done
  fi
  pg_up || missing+=("PostgreSQL at $PGHOST_:$PGPORT_ (install postgresql, or set DATABASE_URL)")
fi
if ! redis_up 2>/dev/null; then
  if command -v redis-server >/dev/null; then
    echo "Redis is stopped: starting it"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$RPORT" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    for _ in $(seq 1 30); do redis_up 2>/dev/null && break; sleep 0.2; done
  fi
  redis_up 2>/dev/null || missing+=("Redis at $RHOST:$RPORT (install redis-server, or set REDIS_URL)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "make test needs these services and could not start them:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 1
fi
echo "services: Postgres at $PGHOST_:$PGPORT_ and Redis at $RHOST:$RPORT are up"
