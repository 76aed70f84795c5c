#!/bin/sh
# Render /etc/nginx/templates/*.template into /etc/nginx/conf.d/ with envsubst, as the
# official nginx image does: only ${NAME} placeholders whose NAME is set in the
# environment are replaced, so nginx's own variables ($host, $request_id, ...) survive.
# An upper-case ${PLACEHOLDER} left unset is an error, not a silently broken config. Then run the
# command (nginx -g 'daemon off;'), after checking the rendered configuration.
set -eu
templates=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
output=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}

# API keys off unless the service has them (Compose passes /_auth when API_KEYS is set).
NGINX_AUTH_REQUEST=${NGINX_AUTH_REQUEST:-off}
export NGINX_AUTH_REQUEST

if [ "${1:-}" = nginx ]; then
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
      echo "nginx-entrypoint: $template uses unset variable(s): $missing" >&2
      exit 1
    fi
    echo "nginx-entrypoint: rendered $template -> $output/$name" >&2
  done
  [ "$found" = 1 ] || echo "nginx-entrypoint: no $templates/*$suffix; serving /etc/nginx/conf.d as is" >&2
  # a restarted container keeps its files: the last run's admission socket would block bind()
  [ -z "${NGINX_ADMISSION_SOCKET:-}" ] || rm -f "$NGINX_ADMISSION_SOCKET"
  nginx -t -q
fi
exec "$@"
