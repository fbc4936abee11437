#!/bin/sh
# Init of the Constellation node image (PID 1): mounts the kernel file systems, loads the
# modules the node needs, brings up networking, prints the boot measurements to the serial
# console (PCR values and the firmware event log: public data, read by tests and operators),
# then runs the bootstrapper. If the bootstrapper exits, the node powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "constellation-init: phase=init uptime=$(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null || echo "constellation-init: insmod $m failed"
done < /etc/modules.order
ip link set lo up
# The cluster network (firmware config entry, unmeasured like cloud metadata): the NIC with
# that MAC gets the node's address; every other NIC asks the platform's DHCP.
cluster_net=/sys/firmware/qemu_fw_cfg/by_name/opt/org.constellation/cluster-net/raw
cluster_mac=
cluster_cidr=
if [ -r "$cluster_net" ]; then
  read -r cluster_mac cluster_cidr < "$cluster_net" || true
fi
for dev in /sys/class/net/*; do
  ifname=${dev##*/}
  [ "$ifname" = lo ] && continue
  ip link set "$ifname" up
  if [ -n "$cluster_mac" ] && [ "$(cat "$dev/address")" = "$cluster_mac" ]; then
    ip addr add "$cluster_cidr" dev "$ifname"
    echo "constellation-init: cluster net $ifname $cluster_cidr"
  elif udhcpc -i "$ifname" -q -n -t 10 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1; then
    echo "constellation-init: net $ifname $(ip -4 -o addr show dev "$ifname" | awk '{print $4}')"
  else
    echo "constellation-init: no DHCP lease on $ifname"
  fi
done
if [ -e /dev/mapper/control ]; then dm=yes; else dm=no; fi
echo "constellation-init: device-mapper $dm"
echo "constellation-init: disks$(for b in /sys/block/*; do case ${b##*/} in loop*|ram*) ;; *) printf ' %s' "${b##*/}";; esac; done)"
echo "===CONSTELLATION-PCRS-BEGIN==="
i=0
while [ $i -le 23 ]; do
  echo "$i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i 2>/dev/null)"
  i=$((i + 1))
done
echo "===CONSTELLATION-PCRS-END==="
echo "===CONSTELLATION-EVENTLOG-BEGIN==="
base64 /sys/kernel/security/tpm0/binary_bios_measurements
echo "===CONSTELLATION-EVENTLOG-END==="
echo "constellation-init: phase=bootstrapper uptime=$(cut -d' ' -f1 /proc/uptime)"
# The bootstrapper's arguments come from the platform, one per line, in the firmware config
# entry opt/org.constellation/bootstrapper-args (like cloud metadata: unmeasured input).
args=/sys/firmware/qemu_fw_cfg/by_name/opt/org.constellation/bootstrapper-args/raw
set --
if [ -r "$args" ]; then
  while IFS= read -r a || [ -n "$a" ]; do set -- "$@" "$a"; done < "$args"
fi
/usr/bin/constellation-bootstrapper "$@"
echo "constellation-init: bootstrapper exited with status $?"
poweroff -f
