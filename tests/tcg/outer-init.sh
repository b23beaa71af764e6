#!/bin/busybox sh
# /init of the TCG test host: a QEMU guest whose emulated AMD CPU has SVM,
# so kvm-amd gives it a /dev/kvm with hardware-virtualization semantics.
#
# It loads kvm, runs each scenario named on its command line
# (`ember.scenarios=a,b,c`) with the ember binary under test, and reports on
# its console in lines the harness parses:
#
#   @@ember begin NAME            start of scenario NAME
#   @| LINE                       a line of the inner guest's console
#   @@ember fact NAME KEY VALUE   a fact measured on this host
#   @@ember end NAME              end of scenario NAME
#
# then powers off. Guest assets are in /guest, ember in /usr/bin (and, for
# the `bench` scenario, Firecracker when the harness added it).

export PATH=/bin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs -o size=1536m tmpfs /tmp
/bin/busybox --install -s /bin

fact() { echo "@@ember fact $1 $2 $3"; }
now() { cut -d' ' -f1 /proc/uptime; }
fact host kernel "$(uname -r)"
fact host boot-seconds "$(now)"

for m in irqbypass kvm ccp kvm-amd tun; do
	insmod /lib/modules/$m.ko 2>/dev/null || fact host insmod-failed "$m"
done
if [ -c /dev/kvm ]; then fact host kvm present; else fact host kvm missing; fi
ip link set lo up

# Waits until file $1 contains the fixed string $2, for at most $3 seconds.
wait_for() {
	i=0
	while ! grep -qF -- "$2" "$1" 2>/dev/null; do
		i=$((i + 1))
		[ $i -gt $(($3 * 5)) ] && return 1
		sleep 0.2
	done
}

# Prints the inner console of scenario $1 from file $2.
show_console() {
	sed 's/^/@| /' "$2"
}

# Writes ember's config for scenario $1: vCPUs $2, extra JSON members $3,
# extra kernel command-line words $4.
config() {
	cat > /tmp/$1.json <<EOF
{
  "boot-source": {
    "kernel_image_path": "/guest/vmlinux",
    "initrd_path": "/guest/initrd.cpio",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off ember.scenario=$1${4:+ $4}"
  },
  "machine-config": { "vcpu_count": $2, "mem_size_mib": 256, "smt": false }$3
}
EOF
}

# The TAP $1 appears when the VMM opens it; gives it the host's address.
tap_up() {
	i=0
	while [ ! -e /sys/class/net/$1 ] && [ $i -lt 3000 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	ip addr add 172.30.0.1/24 dev $1
	ip link set $1 up
}

# Runs ember on scenario $1 until it exits or $2 seconds pass; stdin from
# $3; further arguments go to ember.
run_ember() {
	name=$1 limit=$2 input=$3
	shift 3
	start=$(now)
	timeout "$limit" ember --no-api --config-file /tmp/$name.json "$@" <"$input" >/tmp/$name.out 2>/tmp/$name.err
	fact "$name" ember-rc $?
	fact "$name" ember-seconds "$(awk "BEGIN{print $(now) - $start}")"
}

scenario_boot() {
	config boot 2 ""
	run_ember boot 300 /dev/null
}

scenario_smp4() {
	config smp4 4 ""
	run_ember smp4 300 /dev/null
}

scenario_devices() {
	cp /guest/root.ext4 /guest/ro.ext4 /guest/trim.ext4 /tmp/
	fact devices ro-md5-before "$(md5sum /tmp/ro.ext4 | cut -d' ' -f1)"
	fact devices trim-blocks-before "$(stat -c %b /tmp/trim.ext4)"
	config devices 1 ',
  "drives": [
    {"drive_id": "rootfs", "path_on_host": "/tmp/root.ext4", "is_root_device": true, "is_read_only": false},
    {"drive_id": "ro", "path_on_host": "/tmp/ro.ext4", "is_root_device": false, "is_read_only": true},
    {"drive_id": "trim", "path_on_host": "/tmp/trim.ext4", "is_root_device": false, "is_read_only": false}
  ],
  "network-interfaces": [
    {"iface_id": "eth0", "guest_mac": "06:00:ac:1e:00:02", "host_dev_name": "embertap0"}
  ],
  "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
  "mmds-config": {"version": "V1", "network_interfaces": ["eth0"]}'
	echo '{"latest": {"meta-data": {"instance-id": "i-ember-v1"}}}' >/tmp/metadata-v1.json

	tap_up embertap0 &
	dd if=/dev/urandom of=/tmp/net-send bs=65536 count=64 2>/dev/null
	fact devices net-send-md5 "$(md5sum /tmp/net-send | cut -d' ' -f1)"
	socat -u TCP-LISTEN:5555,reuseaddr CREATE:/tmp/net-recv &
	socat -u FILE:/tmp/net-send TCP-LISTEN:5556,reuseaddr &
	socat -u UNIX-LISTEN:/tmp/v.sock_5001 CREATE:/tmp/vsock-recv &
	dd if=/dev/urandom of=/tmp/vsock-send bs=65536 count=4 2>/dev/null
	fact devices vsock-send-md5 "$(md5sum /tmp/vsock-send | cut -d' ' -f1)"
	# Host to guest: once the guest listens, CONNECT through ember's socket.
	(
		wait_for /tmp/devices.out "ember-guest: vsock-listening" 600 || exit
		i=0
		while [ $i -lt 30 ]; do
			(printf 'CONNECT 5000\n'; sleep 1; cat /tmp/vsock-send; sleep 1) |
				socat -t 5 - UNIX-CONNECT:/tmp/v.sock >/tmp/vsock-reply 2>/dev/null
			if grep -q '^OK ' /tmp/vsock-reply; then break; fi
			i=$((i + 1))
			sleep 1
		done
		fact devices vsock-connect-reply "$(head -n1 /tmp/vsock-reply | tr ' ' _)"
	) &
	run_ember devices 600 /dev/null --metadata /tmp/metadata-v1.json

	debugfs -R 'cat /written.bin' /tmp/root.ext4 2>/dev/null >/tmp/written.bin
	fact devices written-md5 "$(md5sum /tmp/written.bin | cut -d' ' -f1)"
	fact devices ro-md5-after "$(md5sum /tmp/ro.ext4 | cut -d' ' -f1)"
	fact devices trim-blocks-after "$(stat -c %b /tmp/trim.ext4)"
	fact devices net-recv-md5 "$(md5sum /tmp/net-recv | cut -d' ' -f1)"
	fact devices vsock-recv-md5 "$(md5sum /tmp/vsock-recv | cut -d' ' -f1)"
	rm -f /tmp/*.ext4
}

# Sends an API request: method $1, path $2, JSON body $3; prints the status line.
api() {
	printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
		"$1" "$2" "${#3}" "$3" | socat -t 2 - UNIX-CONNECT:/tmp/api.sock | head -n1 | tr -d '\r'
}

scenario_console() {
	config console 1 ""
	rm -f /tmp/console.in /tmp/api.sock
	mkfifo /tmp/console.in
	start=$(now)
	timeout 600 ember --api-sock /tmp/api.sock --config-file /tmp/console.json \
		</tmp/console.in >/tmp/console.out 2>/tmp/console.err &
	pid=$!
	exec 3>/tmp/console.in
	send() { printf '%s\n' "$*" >&3; }

	if wait_for /tmp/console.out "ember-guest: shell ready" 300; then
		sleep 1
		send 'echo typed-$((6 * 7))'
		wait_for /tmp/console.out typed-42 60
		# A few KiB typed, and a few KiB printed.
		seq 1 80 | sed 's/$/ the quick brown fox jumps over the lazy dog 0123456789/' >/tmp/typed
		fact console typed-md5 "$(md5sum /tmp/typed | cut -d' ' -f1)"
		fact console typed-bytes "$(wc -c </tmp/typed)"
		send 'cat > /tmp/typed'
		cat /tmp/typed >&3
		printf '\004' >&3
		# Each marker is computed by the shell, so that the echo of the
		# typed command does not match it.
		send 'echo typed-$((1))-md5=$(md5sum /tmp/typed)'
		wait_for /tmp/console.out "typed-1-md5=" 120
		send 'seq 1 1000; echo seq-$((1))-done'
		wait_for /tmp/console.out "seq-1-done" 120

		# Pause and resume: the clock and the console work afterwards.
		send 'echo uptime-$((1))-before=$(cut -d" " -f1 /proc/uptime)'
		wait_for /tmp/console.out "uptime-1-before=" 60
		fact console pause "$(api PATCH /vm '{"state": "Paused"}' | tr ' ' _)"
		sleep 3
		fact console resume "$(api PATCH /vm '{"state": "Resumed"}' | tr ' ' _)"
		send 'echo uptime-$((1))-after=$(cut -d" " -f1 /proc/uptime)'
		wait_for /tmp/console.out "uptime-1-after=" 60

		fact console ctrl-alt-del "$(api PUT /actions '{"action_type": "SendCtrlAltDel"}' | tr ' ' _)"
	fi
	wait $pid
	fact console ember-rc $?
	fact console ember-seconds "$(awk "BEGIN{print $(now) - $start}")"
	exec 3>&-
}

# Prints ember's resident set in KiB.
rss() {
	for p in /proc/[0-9]*; do
		[ "$(cat $p/comm 2>/dev/null)" = ember ] && awk '/^VmRSS:/ { print $2 }' $p/status
	done
}

# Sends a request like `api` and prints the response body.
api_body() {
	printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$1" "$2" |
		socat -t 2 - UNIX-CONNECT:/tmp/api.sock | sed '1,/^\r$/d'
}

# The balloon's actual size in MiB, from GET /balloon/statistics.
balloon_actual() {
	api_body GET /balloon/statistics | grep -o '"actual_mib":[0-9]*' | cut -d: -f2
}

# MMDS V2, the entropy device and the balloon, under Linux's own drivers:
# the guest reads metadata and /dev/hwrng, then its balloon driver follows
# a PATCH to 64 MiB and one back to 0.
scenario_services() {
	echo '{"latest": {"meta-data": {"instance-id": "i-ember-v2", "local-ipv4": "172.30.0.2"}}}' >/tmp/metadata-v2.json
	config services 1 ',
  "network-interfaces": [
    {"iface_id": "eth0", "guest_mac": "06:00:ac:1e:00:02", "host_dev_name": "embertap0"}
  ],
  "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]},
  "entropy": {},
  "balloon": {"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1},
  "metrics": {"metrics_path": "/tmp/services.metrics"}'
	rm -f /tmp/api.sock
	: >/tmp/services.metrics
	tap_up embertap0 &
	start=$(now)
	timeout 600 ember --api-sock /tmp/api.sock --config-file /tmp/services.json \
		--metadata /tmp/metadata-v2.json </dev/null >/tmp/services.out 2>/tmp/services.err &
	pid=$!
	if wait_for /tmp/services.out "ember-guest: balloon-ready" 300; then
		fact services rss-before-kib "$(rss)"
		fact services inflate "$(api PATCH /balloon '{"amount_mib": 64}' | tr ' ' _)"
		i=0
		while [ "$(balloon_actual)" != 64 ] && [ $i -lt 600 ]; do
			sleep 0.2
			i=$((i + 1))
		done
		fact services actual-mib-inflated "$(balloon_actual)"
		sleep 1
		fact services rss-after-kib "$(rss)"
		fact services stats-keys "$(api_body GET /balloon/statistics | grep -o '"[a-z_]*":' | tr -d '":' | sort | tr '\n' ,)"
		fact services deflate "$(api PATCH /balloon '{"amount_mib": 0}' | tr ' ' _)"
	else
		# Where it stopped: ember's counters, as its stderr.
		api PUT /actions '{"action_type": "FlushMetrics"}' >/dev/null
		sed 's/^/metrics: /' /tmp/services.metrics >>/tmp/services.err
		kill $pid
	fi
	wait $pid
	fact services ember-rc $?
	fact services ember-seconds "$(awk "BEGIN{print $(now) - $start}")"
}

# Benchmark: ember and, where /usr/bin/firecracker is present, Firecracker
# boot the same guest with the same config, alternately, $bench_runs times
# each ($bench_vcpus vCPUs, 256 MiB). The guest's /init prints its uptime
# and reboots at once. Facts per run I of VMM: VMM-rc-I, VMM-wall-I
# (seconds from the VMM's start to its exit) and VMM-init-I (the guest's
# /proc/uptime read by its /init). With $bench_io_mib above 0, then
# bench_io.
scenario_bench() {
	vmms=ember
	[ -x /usr/bin/firecracker ] && vmms="ember firecracker"
	fact bench vmms "$(echo $vmms | tr ' ' ,)"
	fact bench runs "$bench_runs"
	fact bench vcpus "$bench_vcpus"
	fact bench io-mib "$bench_io_mib"
	: >/tmp/bench.out
	: >/tmp/bench.err
	# Firecracker requires the drives member.
	config bench "$bench_vcpus" ',
  "drives": []'
	i=1
	while [ $i -le "$bench_runs" ]; do
		for vmm in $vmms; do
			bench_run $vmm bench $i
		done
		i=$((i + 1))
	done
	[ "$bench_io_mib" -gt 0 ] && bench_io
}

# Runs VMM $1 on config /tmp/$2.json; reports facts $1-rc-$3, $1-wall-$3,
# $1-init-$3 and $1-bytes-$3 (what the guest said it transferred).
bench_run() {
	start=$(now)
	timeout 300 $1 --no-api --config-file /tmp/$2.json </dev/null >/tmp/run.out 2>/tmp/run.err
	rc=$?
	end=$(now)
	fact bench $1-rc-$3 $rc
	fact bench $1-wall-$3 "$(awk "BEGIN{print $end - $start}")"
	fact bench $1-init-$3 \
		"$(sed -n 's/.*ember-guest: init-uptime=\([0-9.]*\).*/\1/p' /tmp/run.out | head -n1)"
	fact bench $1-bytes-$3 \
		"$(sed -n 's/.*ember-guest: bench-bytes=\([0-9]*\).*/\1/p' /tmp/run.out | head -n1)"
	echo "=== $1 $2 $3" >>/tmp/bench.out
	cat /tmp/run.out >>/tmp/bench.out
	sed "s/^/$1 $3: /" /tmp/run.err >>/tmp/bench.err
}

# VM exits per MiB: each VMM runs the guest with a read-only drive, a TAP
# and a metrics file three times: idle (drivers loaded, link up), reading
# $bench_io_mib MiB from the drive (blk), and receiving as many over TCP
# from this host (net). Facts VMM-exits-KIND: the sum of the vcpu metrics
# group's exit_io_in, exit_io_out, exit_mmio_read and exit_mmio_write over
# every metrics line (each line counts since the previous one).
bench_io() {
	dd if=/dev/zero of=/tmp/bench.img bs=1M count=$bench_io_mib 2>/dev/null
	for vmm in $vmms; do
		for kind in idle blk net; do
			config bench-$kind "$bench_vcpus" ',
  "drives": [{"drive_id": "data", "path_on_host": "/tmp/bench.img", "is_root_device": false, "is_read_only": true}],
  "network-interfaces": [{"iface_id": "eth0", "guest_mac": "06:00:ac:1e:00:02", "host_dev_name": "benchtap0"}],
  "metrics": {"metrics_path": "/tmp/metrics.json"}' "ember.bench.mib=$bench_io_mib"
			: >/tmp/metrics.json
			tap_up benchtap0 &
			tap=$!
			sender=
			if [ $kind = net ]; then
				dd if=/dev/zero bs=1M count=$bench_io_mib 2>/dev/null |
					timeout 300 socat -u - TCP-LISTEN:5557,reuseaddr &
				sender=$!
			fi
			bench_run $vmm bench-$kind $kind
			fact bench $vmm-exits-$kind "$(grep -oE '"exit_(io_in|io_out|mmio_read|mmio_write)":[0-9]+' /tmp/metrics.json |
				awk -F: '{ s += $2 } END { print s + 0 }')"
			kill $tap $sender 2>/dev/null
			wait
		done
	done
	rm -f /tmp/bench.img
}

# Interactive: the guest's console is this VM's console (the demo).
scenario_shell() {
	config console 2 ""
	echo "Linux under ember, inside QEMU: a shell comes up on ttyS0; 'reboot -f' ends it."
	ember --no-api --config-file /tmp/console.json
	fact shell ember-rc $?
}

scenarios=
bench_runs=5
bench_vcpus=1
bench_io_mib=0
for word in $(cat /proc/cmdline); do
	case "$word" in
	ember.scenarios=*) scenarios=$(echo "${word#*=}" | tr , ' ') ;;
	ember.bench.runs=*) bench_runs=${word#*=} ;;
	ember.bench.vcpus=*) bench_vcpus=${word#*=} ;;
	ember.bench.io_mib=*) bench_io_mib=${word#*=} ;;
	esac
done

for s in $scenarios; do
	if [ "$s" = shell ]; then
		scenario_shell
		continue
	fi
	echo "@@ember begin $s"
	scenario_$s
	show_console "$s" /tmp/$s.out
	sed 's/^/@@ember stderr /' /tmp/$s.err
	echo "@@ember end $s"
done
echo "@@ember all-done"
poweroff -f
