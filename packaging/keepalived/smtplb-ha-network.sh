#!/bin/sh
# smtplb-ha-network.sh: the optional network step of a keepalived pair of smtplb nodes,
# which makes a planned switch (`smtplb ctl drain`) reset no open session.
#
#   sh smtplb-ha-network.sh up PEER      # PEER: the other node's address on a link that
#   sh smtplb-ha-network.sh down PEER    #   is not the front interface (backend network)
#
# Run it on both nodes (as root, before keepalived starts; e.g. from a oneshot unit, see
# docs/ha.md in smtplb's source). Without it the pair still fails over, but a planned
# switch resets the sessions still open on the old node once the address has moved.
#
# Why: once the new master answers ARP for the virtual address, packets of sessions still
# open on the old node reach the new master, which would reset them. With this step:
#  1. Both nodes hold the address on `lo`, always, and answer ARP only for addresses on
#     the interface the request came in on (arp_ignore=1): only the master, whose
#     keepalived adds the address on the front interface, answers ARP for it.
#  2. A packet for the address that arrives on the front interface, opens no connection
#     (not a bare SYN) and belongs to no connection this node knows is a packet of a
#     session open on the peer: nftables marks it, and a policy route sends it to the peer
#     over the other link, which delivers it to that session. "Knows no connection" is
#     conntrack state new (never seen) or invalid: a client that reuses its port within
#     minutes matches an old entry of this node (TIME_WAIT) whose window its packets do
#     not fit. The peer never sends such a packet back (it only marks what comes in on
#     the front interface), so a packet neither node knows is forwarded once and reset.
#  3. Forwarding is turned on for the front interface only, and the forward chain drops
#     every packet from it that does not carry the mark.
# `nft list table ip smtplb_ha` counts the packets handed to the peer.
# Replies go from the node that owns the session straight to the client.
#
# Settings: edit here or set them in the environment. IPv4 only.
set -eu
VIP=${VIP:-192.0.2.100}   # the virtual address (keepalived's virtual_ipaddress)
FRONT=${FRONT:-eth0}      # the interface clients and VRRP adverts come in on
PORTS=${PORTS:-25}        # smtplb's listener ports for that address, e.g. "25, 587"
MARK=${MARK:-0x2500}      # firewall mark of peer packets (unused by anything else here)
TABLE=${TABLE:-2500}      # routing table that sends them to the peer
PREF=${PREF:-100}         # rule priority; the local table moves from 0 to PREF + 1

usage() { echo "usage: $0 up|down PEER" >&2; exit 64; }
[ $# -eq 2 ] || usage
cmd=$1 peer=$2
# The interface towards the peer: it must not be the front one (see 2.).
back=$(ip -o route get "$peer" | sed -n 's/.* dev \([^ ]*\).*/\1/p')
[ -n "$back" ] || { echo "$0: no route to $peer" >&2; exit 1; }
[ "$back" != "$FRONT" ] || { echo "$0: $peer is reached through $FRONT; use another link" >&2; exit 1; }

case $cmd in
up)
  # Liberal window tracking would take a reused port's packets for the old connection.
  liberal=$(sysctl -n net.netfilter.nf_conntrack_tcp_be_liberal 2>/dev/null || echo 0)
  [ "$liberal" = 0 ] || echo "$0: warning: net.netfilter.nf_conntrack_tcp_be_liberal is $liberal; 0 is needed" >&2
  sysctl -q -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
  ip addr replace "$VIP/32" dev lo
  sysctl -q -w "net.ipv4.conf.$FRONT.forwarding=1"
  # Early demux ties a packet to a local socket before routing, TIME_WAIT ones included,
  # and a packet tied to a socket is never forwarded: a reused port's packets would stay
  # here. Off, every packet is routed (a route lookup per packet for local TCP).
  sysctl -q -w net.ipv4.tcp_early_demux=0
  # Packets the peer forwards here come in on $back with the client's source address.
  sysctl -q -w "net.ipv4.conf.$back.rp_filter=2"
  nft -f - <<NFT
table ip smtplb_ha
delete table ip smtplb_ha
table ip smtplb_ha {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname "$FRONT" ip daddr $VIP tcp dport { $PORTS } ct state { new, invalid } tcp flags & (syn | ack) != syn counter meta mark set $MARK
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "$FRONT" meta mark != $MARK drop
  }
}
NFT
  ip route replace default via "$peer" dev "$back" table "$TABLE"
  ip rule del pref "$PREF" 2>/dev/null || true
  ip rule add pref "$PREF" fwmark "$MARK" lookup "$TABLE"
  if ip rule show pref 0 | grep -q 'lookup local'; then
    ip rule add pref "$((PREF + 1))" lookup local
    ip rule del pref 0
  fi
  ;;
down)
  if ! ip rule show pref 0 | grep -q 'lookup local'; then
    ip rule add pref 0 lookup local
    ip rule del pref "$((PREF + 1))" 2>/dev/null || true
  fi
  ip rule del pref "$PREF" 2>/dev/null || true
  ip route flush table "$TABLE" 2>/dev/null || true
  nft delete table ip smtplb_ha 2>/dev/null || true
  sysctl -q -w "net.ipv4.conf.$FRONT.forwarding=0" net.ipv4.tcp_early_demux=1
  ip addr del "$VIP/32" dev lo 2>/dev/null || true
  ;;
*) usage ;;
esac
