#!/bin/sh
# Render /etc/nginx/templates/*.template into /etc/nginx/conf.d/ with envsubst, as the
# official nginx image does: only ${NAME} placeholders whose NAME is set in the
# environment are replaced, so nginx's own variables ($host, $request_id, ...) survive.
# An upper-case ${PLACEHOLDER} left unset is an error, not a silently broken config. Then run the
# command (nginx -g 'daemon off;'), after checking the rendered configuration.
#
# Upstreams that move (Docker Swarm: a rescheduled task comes back at a new address, and
# nginx 1.22 resolves an upstream's names only at start): NGINX_DISCOVER lists
# PLACEHOLDER=name:port pairs, e.g. "TRITON_HTTP_SERVERS=tasks.triton:8000". Each
# placeholder becomes one "server address:port;" line per address the name has, and every
# NGINX_DISCOVER_INTERVAL seconds (2) the names are looked up again: when an address came
# or went, the configuration is rendered again and nginx reloaded (requests in flight finish
# on the old workers). A name with no address yet gives one "down" server (nginx answers
# 502 for it until an address appears).
set -eu
templates=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
output=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
discover=${NGINX_DISCOVER:-}
interval=${NGINX_DISCOVER_INTERVAL:-2}

# API keys off unless the service has them (Compose passes /_auth when API_KEYS is set).
NGINX_AUTH_REQUEST=${NGINX_AUTH_REQUEST:-off}
export NGINX_AUTH_REQUEST

say() { echo "nginx-entrypoint: $*" >&2; }

# NGINX_DISCOVER: export each placeholder as server lines; print what was found.
look_up() {
  for pair in $discover; do
    name=${pair%%=*} target=${pair#*=}
    host=${target%:*} port=${target##*:}
    addresses=$(getent ahostsv4 "$host" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' ')
    lines=
    for address in $addresses; do
      lines="${lines}server $address:$port; "
    done
    [ -n "$lines" ] || lines="server 127.0.0.1:$port down; "
    export "$name=$lines"
    echo "$name=$lines"
  done
}

render() {
  defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
  found=0
  for template in "$templates"/*"$suffix"; do
    [ -f "$template" ] || continue
    found=1
    name=$(basename "$template" "$suffix")
    case "$name" in *.conf) ;; *) name="$name.conf" ;; esac
    envsubst "$defined" < "$template" > "$output/$name"
    missing=$(grep -o '\${[A-Z_][A-Z0-9_]*}' "$output/$name" | sort -u | tr '\n' ' ' || true)
    if [ -n "$missing" ]; then
      say "$template uses unset variable(s): $missing"
      return 1
    fi
    [ "${1:-}" = quiet ] || say "rendered $template -> $output/$name"
  done
  [ "$found" = 1 ] || say "no $templates/*$suffix; serving /etc/nginx/conf.d as is"
}

upstreams_file=${TMPDIR:-/tmp}/nginx-upstreams
watch_upstreams() {  # in the background, for nginx's lifetime
  known=$(cat "$upstreams_file")
  while sleep "$interval"; do
    look_up >"$upstreams_file"  # (not in a subshell: render needs what it exports)
    now=$(cat "$upstreams_file")
    [ "$now" != "$known" ] || continue
    if render quiet && nginx -t -q; then
      say "upstream addresses changed, reloading: $(echo "$now" | tr '\n' ' ')"
      nginx -s reload && known=$now
    fi
  done
}

if [ "${1:-}" = nginx ]; then
  if [ -n "$discover" ]; then
    look_up >"$upstreams_file"
    say "upstreams from DNS: $(tr '\n' ' ' <"$upstreams_file")"
  fi
  render
  # a restarted container keeps its files: the last run's admission socket would block bind()
  [ -z "${NGINX_ADMISSION_SOCKET:-}" ] || rm -f "$NGINX_ADMISSION_SOCKET"
  nginx -t -q
  [ -z "$discover" ] || watch_upstreams &
fi
exec "$@"
