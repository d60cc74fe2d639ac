#!/bin/sh
# A public gateway must check Twilio signatures and protect the admin API: refuse to start without
# the settings that do so (compose passes them through; empty means unset).
set -eu
missing=""
for name in PUBLIC_URL TWILIO_AUTH_TOKEN ADMIN_TOKEN; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "gateway: set$missing (see README, 'Twilio setup')" >&2
    exit 2
fi
exec "$@"
