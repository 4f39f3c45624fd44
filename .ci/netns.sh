#!/usr/bin/env bash
# Emulated hosts on one machine: network namespaces on a bridge, each with its own address and
# (through the caller, see .ci/slurm.sh) its own hostname, every link shaped to a named profile.
#
#   bash .ci/netns.sh up K PROFILE    # hosts h1..hK at 10.77.0.11.. on bridge mpffbr0 (10.77.0.1)
#   bash .ci/netns.sh link PROFILE    # reshape every host's link (between jobs)
#   bash .ci/netns.sh cut HOST|mend HOST   # take a host's link down / up (a cut cable)
#   bash .ci/netns.sh bytes HOST      # "rx tx" bytes of the host's link, counted on its veth
#   bash .ci/netns.sh down            # remove the hosts and the bridge
#   bash .ci/netns.sh profile         # the profile now applied
#
# A host's link is a veth pair: veth-hX on the bridge (root namespace), eth0 inside mpffhX. A
# profile shapes both ends with tbf (this kernel has tbf and htb but no netem, so no latency or
# loss can be added: only a rate), so traffic either way between two hosts passes two shaped
# links, as between two nodes behind a switch. Profiles:
#   unlimited   no shaping (veth: several GB/s, memory copies)
#   10gbe       10 Gbit/s
#   1gbe        1 Gbit/s
#   100mbit     100 Mbit/s
# Addresses: host hX is 10.77.0.(10+X); the root namespace (slurmctld) is 10.77.0.1.
set -euo pipefail

bridge=mpffbr0
subnet=10.77.0
state="${MPFF_SLURM_DIR:-/var/tmp/mpff-slurm}/netns"

log() { echo "netns.sh: $*" >&2; }

rate_of() {
  case "$1" in
    unlimited) echo "" ;;
    10gbe) echo 10gbit ;;
    1gbe) echo 1gbit ;;
    100mbit) echo 100mbit ;;
    *) log "unknown link profile '$1': use unlimited, 10gbe, 1gbe or 100mbit"; exit 2 ;;
  esac
}

hosts() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^mpffh[0-9]+$' | sed 's/^mpff//' | sort -V || true; }

shape_dev() {  # shape_dev NETNS-OR-EMPTY DEV RATE
  local ns="$1" dev="$2" rate="$3" exec=()
  [ -n "$ns" ] && exec=(ip netns exec "$ns")
  "${exec[@]}" tc qdisc del dev "$dev" root 2>/dev/null || true
  if [ -n "$rate" ]; then
    # burst: at least rate/HZ and a few full frames; the queue holds 50 ms of traffic
    "${exec[@]}" tc qdisc add dev "$dev" root tbf rate "$rate" burst 256kb latency 50ms
  fi
}

cmd_link() {
  local profile="$1" rate h
  rate="$(rate_of "$profile")"
  for h in $(hosts); do
    shape_dev "" "veth-$h" "$rate"
    shape_dev "mpff$h" eth0 "$rate"
  done
  mkdir -p "$state"
  echo "$profile" >"$state/profile"
  log "links shaped: $profile"
}

cmd_up() {
  local k="$1" profile="$2" i h
  rate_of "$profile" >/dev/null
  cmd_down quiet
  ip link add "$bridge" type bridge
  ip addr add "$subnet.1/24" dev "$bridge"
  ip link set "$bridge" up
  for i in $(seq 1 "$k"); do
    h="h$i"
    ip netns add "mpff$h"
    ip link add "veth-$h" type veth peer name eth0 netns "mpff$h"
    ip link set "veth-$h" master "$bridge" up
    ip netns exec "mpff$h" ip addr add "$subnet.$((10 + i))/24" dev eth0
    ip netns exec "mpff$h" ip link set eth0 up
    ip netns exec "mpff$h" ip link set lo up
    ip netns exec "mpff$h" ip route add default via "$subnet.1"
  done
  cmd_link "$profile"
}

cmd_down() {
  local h
  for h in $(hosts); do
    ip link del "veth-$h" 2>/dev/null || true
    ip netns del "mpff$h" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  rm -f "$state/profile"
  [ -n "${1:-}" ] || log "hosts removed"
}

cmd_bytes() {
  # seen from the host: what it received (the veth's tx) and sent (the veth's rx)
  local dev="veth-$1"
  echo "$(cat "/sys/class/net/$dev/statistics/tx_bytes") $(cat "/sys/class/net/$dev/statistics/rx_bytes")"
}

case "${1:-}" in
  up) cmd_up "${2:-2}" "${3:-unlimited}" ;;
  link) cmd_link "${2:?profile}" ;;
  cut) ip link set "veth-${2:?host}" down ;;
  mend) ip link set "veth-${2:?host}" up ;;
  bytes) cmd_bytes "${2:?host}" ;;
  hosts) hosts ;;
  profile) cat "$state/profile" 2>/dev/null || echo none ;;
  down) cmd_down ;;
  *)
    echo "usage: bash .ci/netns.sh up K PROFILE | link PROFILE | cut HOST | mend HOST | bytes HOST | hosts | profile | down" >&2
    exit 2
    ;;
esac
