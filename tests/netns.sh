#!/bin/sh
# Run a command in a private network namespace whose only interface is loopback.
#
# WebRTC tests need it: ICE (aioice, Chromium) never offers 127.0.0.1 as a host candidate and
# would otherwise send the call's media over the machine's network interface. Here the only
# interface is `lo` with a second loopback address, 127.0.0.2, so every packet stays on loopback.
set -eu
if [ "$(id -u)" -eq 0 ]; then flags=-n; else flags=-rn; fi
exec unshare $flags sh -c 'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec "$@"' netns "$@"
