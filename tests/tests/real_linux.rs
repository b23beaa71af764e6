//! Real Linux under ember, with Linux's own drivers on every device.
//!
//! The guest is Debian's cloud kernel; ember runs inside the TCG test host
//! (QEMU with an emulated AMD CPU with SVM, see `ember_tests::tcg`), where
//! KVM has hardware-virtualization semantics. One boot of the test host runs
//! every scenario; each test below checks one of them and shows the
//! scenario's console when it fails.

use std::sync::OnceLock;
use std::time::Duration;

use ember_tests::tcg::{run_scenarios, Report, Scenario, SCENARIOS};

/// An API request's status line as the outer VM reports it.
const NO_CONTENT: &str = "HTTP/1.1_204_No_Content";

/// Limit on one boot of the test host running every scenario.
const HOST_TIMEOUT: Duration = Duration::from_secs(1500);

/// The one boot of the test host all tests share.
fn report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        // For work on one scenario: EMBER_TCG_SCENARIOS=boot,console runs
        // only those (the other tests then fail).
        let chosen = std::env::var("EMBER_TCG_SCENARIOS").ok();
        let scenarios: Vec<&str> = match &chosen {
            Some(list) => list.split(',').collect(),
            None => SCENARIOS.to_vec(),
        };
        let report = run_scenarios(&scenarios, HOST_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot run the TCG test host: {e}"));
        eprintln!(
            "TCG test host: outer boot {:?}, wall {:?}",
            report.outer_boot, report.wall
        );
        report
    })
}

/// Scenario `name`, finished; panics with the outer console otherwise.
fn scenario(name: &str) -> &'static Scenario {
    let report = report();
    assert_eq!(
        report.host.get("kvm").map(String::as_str),
        Some("present"),
        "kvm-amd did not give the test host a /dev/kvm\n{report}"
    );
    match report.scenario(name) {
        Some(s) if s.finished => s,
        _ => panic!("scenario {name} did not run to its end\n{report}"),
    }
}

fn assert_exit_0(s: &Scenario) {
    assert_eq!(s.fact("ember-rc"), Some("0"), "ember must exit 0\n{s}");
}

#[test]
fn linux_boots_to_init_and_reboot_f_ends_ember_with_0() {
    let s = scenario("boot");
    assert!(s.kernel_time("ember-guest: init reached").is_some(), "{s}");
    assert_eq!(s.guest("done"), None, "`done` carries no value\n{s}");
    assert!(
        s.console.iter().any(|l| l.contains("ember-guest: done")),
        "{s}"
    );
    assert_exit_0(s);
}

/// Linux's `rtc_cmos` probe reads the CMOS ports 0x70/0x71, which ember
/// leaves unclaimed; answered with all-ones it polled for seconds on every
/// boot. Bounded against the same boot's own kernel timestamps.
#[test]
fn kernel_to_init_is_not_stalled_by_probes() {
    let s = scenario("boot");
    let init = s
        .kernel_time("ember-guest: init reached")
        .unwrap_or_else(|| panic!("no init timestamp\n{s}"));
    // The longest silence between two consecutive kernel lines before init.
    // The line that enables the serial console follows the flush of every
    // message buffered so far, one port write per character: not a stall.
    let stamps: Vec<(f64, &str)> = s
        .console
        .iter()
        .filter_map(|l| Some((ember_tests::tcg::kernel_timestamp(l)?, l.as_str())))
        .take_while(|(t, _)| *t <= init)
        .collect();
    let console_enabled = |line: &str| line.contains("printk: console [ttyS0] enabled");
    let (gap, after) = stamps
        .windows(2)
        .filter(|w| !console_enabled(w[1].1))
        .map(|w| (w[1].0 - w[0].0, w[1].1))
        .fold(
            (0.0, ""),
            |best, cur| if cur.0 > best.0 { cur } else { best },
        );
    eprintln!("kernel to init: {init:.2} s; longest silence {gap:.2} s before: {after}");
    // The probe's own silence: all-ones from 0x70/0x71 made it 7-20 s.
    let rtc = stamps
        .windows(2)
        .find(|w| w[1].1.contains("rtc_cmos rtc_cmos:"))
        .map(|w| w[1].0 - w[0].0);
    let rtc = rtc.unwrap_or_else(|| panic!("no rtc_cmos probe result before init\n{s}"));
    assert!(rtc < 2.0, "the rtc_cmos probe took {rtc:.2} s\n{s}");
    assert!(
        gap < 5.0,
        "the kernel stalled {gap:.2} s before `{after}`\n{s}"
    );
    assert!(init < 30.0, "init reached only after {init:.2} s\n{s}");
}

#[test]
fn two_vcpus_come_online() {
    let s = scenario("boot");
    assert_eq!(s.guest("cpus-online"), Some("0-1"), "{s}");
    assert_exit_0(s);
}

#[test]
fn four_vcpus_come_online() {
    let s = scenario("smp4");
    assert_eq!(s.guest("cpus-online"), Some("0-3"), "{s}");
    assert_exit_0(s);
}

#[test]
fn root_filesystem_on_virtio_blk_is_written_back_to_the_image() {
    let s = scenario("devices");
    let mount = s.guest("root-mount").unwrap_or_default();
    assert!(
        mount.starts_with("/dev/vda,/,ext4,rw"),
        "root must be /dev/vda, ext4, read-write: {mount}\n{s}"
    );
    let written = s.guest("written-md5");
    assert!(written.is_some(), "{s}");
    assert_eq!(
        s.fact("written-md5"),
        written,
        "the host reads back what the guest wrote\n{s}"
    );
    assert_exit_0(s);
}

#[test]
fn read_only_drive_refuses_writes_and_stays_unchanged() {
    let s = scenario("devices");
    assert_eq!(s.guest("ro-flag"), Some("1"), "{s}");
    assert_eq!(s.guest("ro-write"), Some("failed"), "{s}");
    assert!(s.fact("ro-md5-before").is_some(), "{s}");
    assert_eq!(s.fact("ro-md5-before"), s.fact("ro-md5-after"), "{s}");
}

#[test]
fn fstrim_punches_holes_in_the_image() {
    let s = scenario("devices");
    let blocks = |key| -> u64 {
        s.fact(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}\n{s}"))
    };
    let (before, after) = (blocks("trim-blocks-before"), blocks("trim-blocks-after"));
    // The 16 MiB filler is 32768 blocks of 512 bytes; most must be gone.
    assert!(
        after + 24_000 < before,
        "allocated 512-byte blocks {before} -> {after}\n{s}"
    );
}

#[test]
fn virtio_net_ping_and_bulk_tcp_both_ways() {
    let s = scenario("devices");
    assert_eq!(s.guest("ping"), Some("ok"), "{s}");
    assert_eq!(s.guest("net-out-rc"), Some("0"), "{s}");
    assert!(s.guest("net-out-md5").is_some(), "{s}");
    assert_eq!(
        s.fact("net-recv-md5"),
        s.guest("net-out-md5"),
        "guest to host\n{s}"
    );
    assert_eq!(s.guest("net-in-rc"), Some("0"), "{s}");
    assert_eq!(
        s.fact("net-send-md5"),
        s.guest("net-in-md5"),
        "host to guest\n{s}"
    );
}

#[test]
fn vsock_both_ways_through_the_hybrid_unix_socket() {
    let s = scenario("devices");
    let reply = s.fact("vsock-connect-reply").unwrap_or_default();
    assert!(
        reply.starts_with("OK_"),
        "CONNECT 5000 answered {reply:?}\n{s}"
    );
    assert_eq!(s.guest("vsock-in-rc"), Some("0"), "{s}");
    assert!(s.fact("vsock-send-md5").is_some(), "{s}");
    assert_eq!(
        s.guest("vsock-in-md5"),
        s.fact("vsock-send-md5"),
        "host to guest\n{s}"
    );
    assert_eq!(s.guest("vsock-out-rc"), Some("0"), "{s}");
    assert!(s.guest("vsock-out-md5").is_some(), "{s}");
    assert_eq!(
        s.fact("vsock-recv-md5"),
        s.guest("vsock-out-md5"),
        "guest to host\n{s}"
    );
}

/// The feature bits Linux acknowledged, per virtio device id (sysfs prints
/// bit 0 first). VIRTIO_F_VERSION_1 (bit 32) is mandatory for virtio-mmio
/// version 2.
#[test]
fn linux_acks_virtio_features() {
    let s = scenario("devices");
    let features = s.guest_values("virtio-features");
    eprintln!("features Linux acked (device id:bits from 0): {features:#?}");
    let mut ids: Vec<&str> = features
        .iter()
        .filter_map(|f| f.split(':').next())
        .collect();
    ids.sort_unstable();
    // Three drives (2), one net (1), one vsock (19).
    assert_eq!(
        ids,
        ["0x0001", "0x0002", "0x0002", "0x0002", "0x0013"],
        "{s}"
    );
    // sysfs prints the accepted feature bits, bit 0 first.
    let acked = |f: &str, bit: usize| {
        f.split(':').nth(1).unwrap_or_default().as_bytes().get(bit) == Some(&b'1')
    };
    for f in &features {
        assert!(acked(f, 32), "VERSION_1 in {f}\n{s}");
        // Notification suppression on every device (VIRTIO_RING_F_EVENT_IDX).
        assert!(acked(f, 29), "EVENT_IDX in {f}\n{s}");
    }
    // VIRTIO_NET_F_MRG_RXBUF on the network device.
    let net = features.iter().find(|f| f.starts_with("0x0001:"));
    assert!(
        net.is_some_and(|f| acked(f, 15)),
        "MRG_RXBUF in {net:?}\n{s}"
    );
}

#[test]
fn serial_console_shell_reads_typed_input_without_loss() {
    let s = scenario("console");
    assert!(
        s.console.iter().any(|l| l.trim_end() == "typed-42"),
        "the typed command ran\n{s}"
    );
    let md5 = s.fact("typed-md5").unwrap_or_else(|| panic!("{s}"));
    assert!(
        s.console
            .iter()
            .any(|l| l.trim_end().starts_with(&format!("typed-1-md5={md5}"))),
        "the guest received every typed byte once ({} bytes)\n{s}",
        s.fact("typed-bytes").unwrap_or("?")
    );
    // Output: 1..=1000, each exactly once and in order, between the last
    // echo of the command and its end marker. The command can be echoed
    // twice: typed ahead of the prompt, the line discipline echoes it at
    // once and the shell again after its prompt.
    let end = s
        .console
        .iter()
        .position(|l| l.trim_end() == "seq-1-done")
        .unwrap_or_else(|| panic!("no end marker of the seq command\n{s}"));
    let start = s.console[..end]
        .iter()
        .rposition(|l| l.contains("seq 1 1000; echo seq-$((1))-done"))
        .unwrap_or_else(|| panic!("no echo of the seq command\n{s}"));
    let numbers: Vec<&str> = s.console[start + 1..end]
        .iter()
        .map(|l| l.trim_end())
        .collect();
    let want: Vec<String> = (1..=1000).map(|n| n.to_string()).collect();
    assert_eq!(numbers, want, "{s}");
}

#[test]
fn pause_and_resume_keep_the_clock_and_console_working() {
    let s = scenario("console");
    assert_eq!(s.fact("pause"), Some(NO_CONTENT), "{s}");
    assert_eq!(s.fact("resume"), Some(NO_CONTENT), "{s}");
    let uptime = |key: &str| -> f64 {
        s.console
            .iter()
            .filter_map(|l| l.trim_end().strip_prefix(&format!("uptime-1-{key}=")))
            .find_map(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}\n{s}"))
    };
    let (before, after) = (uptime("before"), uptime("after"));
    assert!(after > before, "uptime {before} -> {after}\n{s}");
}

#[test]
fn send_ctrl_alt_del_reboots_linux_and_ember_exits_0() {
    let s = scenario("console");
    assert_eq!(s.fact("ctrl-alt-del"), Some(NO_CONTENT), "{s}");
    assert_exit_0(s);
}

/// Kernel messages the machine Linux runs on here makes it print, each
/// with its cause (docs/testing.md explains them). Anything else that
/// looks like a warning or an error fails the test.
const EXPECTED_KERNEL_MESSAGES: &[(&str, &str)] = &[
    // No CMOS RTC: reads of the unclaimed ports 0x70/0x71 return 0, as on
    // Firecracker, so status register B says 12-hour mode.
    ("rtc_cmos rtc_cmos: only 24-hr supported", "no CMOS RTC"),
    // No SMBIOS tables, as on Firecracker.
    ("DMI not present or invalid", "no SMBIOS"),
    // pci=off: no PCI, as on Firecracker.
    (
        "PCI: Fatal: No config space access function found",
        "no PCI",
    ),
    ("if necessary, use \"pci=nocrs\" and report a bug", "no PCI"),
    // Informational ("invalidation").
    ("iommu: DMA domain TLB invalidation policy", "informational"),
    // The TCG test host's CPUID leaf 0xD gives the nested guest XSAVE
    // sizes that do not match; Linux warns once, with a stack trace, and
    // turns XSAVE features off. Firecracker shows the same.
    ("XSAVE consistency problem", "TCG host"),
    ("at arch/x86/kernel/fpu/xstate.c", "TCG host"),
    ("Not tainted", "TCG host"),
    ("------------[ cut here ]------------", "TCG host"),
    ("Call Trace:", "TCG host"),
    ("---[ end trace", "TCG host"),
    // Under software emulation the TSC drifts against kvm-clock; Linux
    // keeps kvm-clock as its clocksource.
    ("Marking TSC unstable", "TCG host"),
    ("Marking clocksource 'tsc' as unstable", "TCG host"),
    ("clocksource:  ", "TCG host"),
    (
        "Unstable clock detected, switching default tracing clock",
        "TCG host",
    ),
];

#[test]
fn kernel_log_has_no_unexplained_warnings_or_errors() {
    const SUSPICIOUS: &[&str] = &[
        "warn",
        "error",
        "fail",
        "bug",
        "unable",
        "invalid",
        "timed out",
        "timeout",
        "unstable",
        "not supported",
        "only 24",
        "taint",
        "fatal",
        "cut here",
        "call trace",
        "cannot",
        "can't",
        "unknown",
        "spurious",
    ];
    let mut unexplained = Vec::new();
    for name in SCENARIOS {
        let s = scenario(name);
        for line in &s.console {
            let Some((_, message)) = line.split_once("] ") else {
                continue;
            };
            if ember_tests::tcg::kernel_timestamp(line).is_none() {
                continue;
            }
            let lower = message.to_lowercase();
            if !SUSPICIOUS.iter().any(|word| lower.contains(word)) {
                continue;
            }
            if EXPECTED_KERNEL_MESSAGES
                .iter()
                .any(|(text, _)| message.contains(text))
            {
                continue;
            }
            unexplained.push(format!("{name}: {line}"));
        }
    }
    assert!(
        unexplained.is_empty(),
        "kernel messages not explained in docs/testing.md:\n{}",
        unexplained.join("\n")
    );
}

/// MMDS V1 through Linux's own network stack: busybox `wget` reads a value
/// of the store loaded with `--metadata`, with no token.
#[test]
fn mmds_v1_answers_linux_wget() {
    let s = scenario("devices");
    assert_eq!(s.guest("mmds-v1-instance-id"), Some("i-ember-v1"), "{s}");
}

/// MMDS V2: Linux gets a session token with `PUT /latest/api/token`,
/// reads values and a listing with it, and is refused without it.
#[test]
fn mmds_v2_gives_linux_a_token_and_refuses_gets_without_one() {
    let s = scenario("services");
    let length: usize = s
        .guest("mmds-token-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    assert!(length > 0, "no token\n{s}");
    assert_eq!(s.guest("mmds-v2-instance-id"), Some("i-ember-v2"), "{s}");
    assert_eq!(
        s.guest("mmds-v2-keys"),
        Some("instance-id,local-ipv4"),
        "the IMDS listing of meta-data/\n{s}"
    );
    assert_eq!(s.guest("mmds-v2-without-token"), Some("refused:401"), "{s}");
    assert_exit_0(s);
}

/// virtio-rng under Linux's `virtio_rng` driver: the hw_random core selects
/// it and `/dev/hwrng` reads random bytes.
#[test]
fn linux_hwrng_reads_from_virtio_rng() {
    let s = scenario("services");
    let current = s.guest("hwrng-current").unwrap_or_default();
    assert!(
        current.starts_with("virtio_rng"),
        "rng_current {current:?}\n{s}"
    );
    assert_eq!(s.guest("hwrng-bytes"), Some("4096"), "{s}");
    assert_eq!(s.guest("hwrng-reads"), Some("distinct"), "{s}");
    // 4096 random bytes hold about 16 zeros; a buffer left unfilled holds
    // thousands.
    let zeros: u32 = s
        .guest("hwrng-zero-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    assert!(zeros < 100, "{zeros} zero bytes in 4096\n{s}");
}

/// Linux's `virtio_balloon` driver follows a live `PATCH /balloon`: it
/// takes 64 MiB out of the guest's MemTotal, Ember gives the pages back to
/// the host (its RSS falls), statistics arrive, and a PATCH back to 0
/// returns the memory to the guest.
#[test]
fn linux_balloon_driver_follows_patches_and_host_rss_follows() {
    let s = scenario("services");
    let kib = |v: Option<&str>, what: &str| -> i64 {
        v.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {what}\n{s}"))
    };
    assert_eq!(s.fact("inflate"), Some("HTTP/1.1_204_No_Content"), "{s}");
    assert_eq!(s.fact("actual-mib-inflated"), Some("64"), "{s}");
    let before = kib(s.guest("memtotal-before"), "memtotal-before");
    let inflated = kib(s.guest("memtotal-inflated"), "memtotal-inflated");
    let deflated = kib(s.guest("memtotal-deflated"), "memtotal-deflated");
    assert_eq!(before - inflated, 64 * 1024, "guest MemTotal\n{s}");
    assert_eq!(deflated, before, "guest MemTotal after deflating\n{s}");
    let rss_before = kib(s.fact("rss-before-kib"), "rss-before-kib");
    let rss_after = kib(s.fact("rss-after-kib"), "rss-after-kib");
    eprintln!("ember RSS {rss_before} KiB -> {rss_after} KiB with 64 MiB in the balloon");
    assert!(
        rss_before - rss_after >= 40 * 1024,
        "host RSS {rss_before} KiB -> {rss_after} KiB\n{s}"
    );
    let keys = s.fact("stats-keys").unwrap_or_default();
    for key in ["actual_mib", "target_mib", "free_memory", "total_memory"] {
        assert!(
            keys.split(',').any(|k| k == key),
            "no {key} in statistics: {keys}\n{s}"
        );
    }
    assert_eq!(s.fact("deflate"), Some("HTTP/1.1_204_No_Content"), "{s}");
    assert_exit_0(s);
}
