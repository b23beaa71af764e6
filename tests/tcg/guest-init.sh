#!/bin/busybox sh
# /init of the Linux guest that ember boots inside the TCG test host.
#
# The same tree is the guest's initrd and the root filesystem image of the
# `devices` scenario. The kernel command line picks the scenario
# (`ember.scenario=NAME`); results are `ember-guest: key=value` lines on
# the console, which the harness parses. Every scenario ends with
# `reboot -f`, which ember must answer by exiting 0, except `console`,
# which waits for Ctrl+Alt+Del from ember's API.

export PATH=/bin
busybox mkdir -p /proc /sys /dev /tmp /mnt /newroot
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
busybox mount -t tmpfs tmpfs /tmp
busybox --install -s /bin 2>/dev/null

say() { echo "ember-guest: $*"; }
# Timestamped by the kernel, for the boot-time checks.
mark() { echo "ember-guest: $*" > /dev/kmsg; }

scenario=
root=
for word in $(cat /proc/cmdline); do
	case "$word" in
	ember.scenario=*) scenario=${word#*=} ;;
	root=*) root=${word#*=} ;;
	esac
done

finish() {
	say "done"
	sync
	reboot -f
}

if [ -e /etc/ember-initrd ]; then
	mark "init reached"
	say "init-uptime=$(cut -d' ' -f1 /proc/uptime)"
	say "cpus-online=$(cat /sys/devices/system/cpu/online)"
	# The boot benchmark: kernel start to init only.
	[ "$scenario" = bench ] && reboot -f
	for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover \
		virtio_net vsock vmw_vsock_virtio_transport_common \
		vmw_vsock_virtio_transport virtio_balloon virtio-rng; do
		insmod /lib/modules/$m.ko || say "insmod-failed=$m"
	done
	if [ -n "$root" ]; then
		# Drivers are modules: wait for the disk, then move onto it.
		i=0
		while [ ! -b "$root" ] && [ $i -lt 100 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		mount -t ext4 "$root" /newroot || say "root-mount-failed=$root"
		umount /proc /sys /tmp
		exec switch_root /newroot /init
	fi
fi

case "$scenario" in
boot)
	finish
	;;
devices)
	say "root-mount=$(grep ' / ' /proc/mounts | head -n1 | tr ' ' ,)"
	for d in /sys/bus/virtio/devices/*; do
		say "virtio-features=$(cat $d/device):$(cat $d/features)"
	done

	# Read-write root on virtio-blk: the harness reads this file back from
	# the image after ember exits.
	dd if=/dev/urandom of=/written.bin bs=4096 count=256 2>/dev/null
	say "written-md5=$(md5sum /written.bin | cut -d' ' -f1)"
	sync

	# Read-only drive: the kernel marks the disk read-only and a write fails.
	say "ro-flag=$(cat /sys/block/vdb/ro)"
	if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then
		say "ro-write=succeeded"
	else
		say "ro-write=failed"
	fi

	# Discard: delete the filler and trim; the host image must lose blocks.
	mount -t ext4 /dev/vdc /mnt && rm -f /mnt/filler && sync
	say "fstrim=$(fstrim -v /mnt 2>&1 | tr ' ' _)"
	umount /mnt

	# virtio-net: the peer is the outer VM's end of the TAP.
	ip link set eth0 up
	ip addr add 172.30.0.2/24 dev eth0
	if ping -c 3 -W 5 172.30.0.1 >/tmp/ping 2>&1; then
		say "ping=ok"
	else
		say "ping=failed"
		cat /tmp/ping
	fi
	# MMDS V1 (no token): the address is on-link through eth0.
	ip route add 169.254.169.254 dev eth0
	say "mmds-v1-instance-id=$(timeout 30 wget -q -O- http://169.254.169.254/latest/meta-data/instance-id)"
	dd if=/dev/urandom of=/tmp/net-out bs=65536 count=64 2>/dev/null
	say "net-out-md5=$(md5sum /tmp/net-out | cut -d' ' -f1)"
	socat -u FILE:/tmp/net-out TCP:172.30.0.1:5555,connect-timeout=30
	say "net-out-rc=$?"
	socat -u TCP:172.30.0.1:5556,connect-timeout=30 CREATE:/tmp/net-in
	say "net-in-rc=$? net-in-md5=$(md5sum /tmp/net-in | cut -d' ' -f1)"

	# vsock: the host connects in through ember's Unix socket (CONNECT
	# 5000), then the guest connects out to the host's <uds_path>_5001.
	say "vsock-listening"
	timeout 120 socat -u VSOCK-LISTEN:5000 CREATE:/tmp/vsock-in
	say "vsock-in-rc=$? vsock-in-md5=$(md5sum /tmp/vsock-in | cut -d' ' -f1)"
	dd if=/dev/urandom of=/tmp/vsock-out bs=65536 count=8 2>/dev/null
	say "vsock-out-md5=$(md5sum /tmp/vsock-out | cut -d' ' -f1)"
	socat -u FILE:/tmp/vsock-out VSOCK-CONNECT:2:5001
	say "vsock-out-rc=$?"
	finish
	;;
services)
	# MMDS V2 through Linux's own stack: the address is on-link through
	# eth0, where ember's stack answers ARP and TCP for it. Each step is
	# marked in the kernel log too, which reaches the console without the
	# tty: a step that hangs is named even if the shell's output stops.
	mark "step mmds"
	ip link set eth0 up
	ip addr add 172.30.0.2/24 dev eth0
	ip route add 169.254.169.254 dev eth0
	mmds=http://169.254.169.254/latest/meta-data
	token=$(printf 'PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' |
		timeout 60 socat -t 5 - TCP:169.254.169.254:80,connect-timeout=30 | tail -n1 | tr -d '\r')
	say "mmds-token-length=${#token}"
	say "mmds-v2-instance-id=$(timeout 30 wget -q -O- --header "X-metadata-token: $token" $mmds/instance-id)"
	say "mmds-v2-keys=$(timeout 30 wget -q -O- --header "X-metadata-token: $token" $mmds/ | tr '\n' ,)"
	if timeout 30 wget -O- $mmds/instance-id >/dev/null 2>/tmp/no-token; then
		say "mmds-v2-without-token=served"
	else
		say "mmds-v2-without-token=refused:$(grep -o '40[0-9]' /tmp/no-token | head -n1)"
	fi

	# virtio-rng: the kernel's hw_random core picks it up.
	mark "step hwrng"
	say "hwrng-current=$(cat /sys/class/misc/hw_random/rng_current)"
	timeout 60 dd if=/dev/hwrng of=/tmp/rng1 bs=1024 count=4 2>/dev/null
	timeout 60 dd if=/dev/hwrng of=/tmp/rng2 bs=1024 count=4 2>/dev/null
	say "hwrng-bytes=$(wc -c </tmp/rng1)"
	if cmp -s /tmp/rng1 /tmp/rng2; then say "hwrng-reads=equal"; else say "hwrng-reads=distinct"; fi
	say "hwrng-zero-bytes=$(od -An -v -tx1 /tmp/rng1 | tr ' ' '\n' | grep -c '^00$')"

	# virtio-balloon: touch memory and free it, so that the host backs
	# it, then follow the target the host sets with PATCH /balloon. Without
	# deflate-on-oom Linux takes inflated pages out of MemTotal.
	mark "step balloon"
	memtotal() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
	dd if=/dev/zero of=/tmp/fill bs=1M count=96 2>/dev/null
	rm -f /tmp/fill
	before=$(memtotal)
	say "memtotal-before=$before"
	say "balloon-ready"
	i=0
	while [ "$(memtotal)" -gt $((before - 64 * 1024)) ] && [ $i -lt 1200 ]; do
		sleep 0.2
		i=$((i + 1))
	done
	say "memtotal-inflated=$(memtotal)"
	i=0
	while [ "$(memtotal)" -lt $((before - 1024)) ] && [ $i -lt 1200 ]; do
		sleep 0.2
		i=$((i + 1))
	done
	say "memtotal-deflated=$(memtotal)"
	finish
	;;
bench-idle | bench-blk | bench-net)
	# VM exits per MiB (the outer `bench` scenario): the same set-up each
	# time, then the drive read or TCP from the host, ember.bench.mib MiB.
	mib=$(sed -n 's/.*ember\.bench\.mib=\([0-9]*\).*/\1/p' /proc/cmdline)
	i=0
	while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	ip link set eth0 up
	ip addr add 172.30.0.2/24 dev eth0
	case "$scenario" in
	bench-blk)
		say "bench-bytes=$(dd if=/dev/vda bs=1M count=$mib 2>/dev/null | wc -c)"
		;;
	bench-net)
		say "bench-bytes=$(socat -u TCP:172.30.0.1:5557,connect-timeout=30 - | wc -c)"
		;;
	esac
	finish
	;;
console)
	# Kernel messages printed later (the clocksource watchdog of the
	# emulated host, say) would land in the middle of the shell's output
	# that the test compares line by line: from here on only emergencies
	# reach the console. Boot messages were printed above, for the
	# kernel-log check.
	echo 1 > /proc/sys/kernel/printk
	say "shell ready"
	export PS1='guest# '
	exec setsid cttyhack sh
	;;
*)
	say "unknown-scenario=$scenario"
	finish
	;;
esac
