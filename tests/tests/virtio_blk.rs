//! virtio-blk end to end: the `virtio_blk` guest finds its drives (through
//! the `virtio_mmio.device=` command line or the ACPI DSDT), initializes
//! them as Linux's virtio_mmio and virtio_blk drivers do, runs requests and
//! reports each result on the serial port; the test then checks both the
//! report and the bytes of the backing file on the host.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_tests::{guest_path, run_guest, Output};
use serde_json::{json, Value};

const SECTOR: u64 = 512;
/// 8 MiB image: 16384 sectors.
const IMAGE_SECTORS: u64 = 16384;
/// The range the guest writes and reads back.
const IO_SECTOR: u64 = 64;
const IO_SECTORS: u64 = 16;
/// The range the guest discards (aligned to 4 KiB file system blocks, so
/// that the hole punch frees whole blocks).
const DISCARD_SECTOR: u64 = 1024;
const DISCARD_SECTORS: u64 = 256;
/// The range of the write-zeroes request.
const ZERO_SECTOR: u64 = 2048;
const ZERO_SECTORS: u64 = 256;
/// A range nobody touches, to check nothing else changed.
const UNTOUCHED_SECTOR: u64 = 4096;
const UNTOUCHED_SECTORS: u64 = 64;

// Feature bits (virtio 1.2 §5.2.3, §6).
const F_RO: u32 = 5;
const F_FLUSH: u32 = 9;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;
const F_VERSION_1: u32 = 32;
/// What the guest driver accepts when offered (virtio_blk.c WANTED_FEATURES).
const WANTED: u64 = 1 << F_VERSION_1
    | 1 << 2 // SEG_MAX
    | 1 << F_RO
    | 1 << 6 // BLK_SIZE
    | 1 << F_FLUSH
    | 1 << F_DISCARD
    | 1 << F_WRITE_ZEROES;

/// The guest's pattern (virtio_blk.c `pattern`): the byte at disk offset `off`.
fn pattern(seed: u64, off: u64) -> u8 {
    (seed
        .wrapping_add((off >> 9).wrapping_mul(13))
        .wrapping_add((off & 511) * 7)) as u8
}

fn pattern_bytes(seed: u64, sector: u64, sectors: u64) -> Vec<u8> {
    let base = sector * SECTOR;
    (0..sectors * SECTOR)
        .map(|i| pattern(seed, base + i))
        .collect()
}

/// A directory for the images, removed on drop.
struct Images(tempfile::TempDir);

impl Images {
    fn new() -> Self {
        Images(tempfile::tempdir().expect("create a temp dir"))
    }

    /// A sparse image of `sectors` sectors.
    fn sparse(&self, name: &str, sectors: u64) -> PathBuf {
        let path = self.0.path().join(name);
        let f = File::create(&path).expect("create the image");
        f.set_len(sectors * SECTOR).expect("size the image");
        path
    }
}

fn write_at(path: &Path, sector: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, sector * SECTOR).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, sector: u64, sectors: u64) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; (sectors * SECTOR) as usize];
    f.read_exact_at(&mut buf, sector * SECTOR).unwrap();
    buf
}

fn drive(id: &str, path: &Path, engine: &str, read_only: bool, root: bool) -> Value {
    json!({
        "drive_id": id,
        "path_on_host": path,
        "is_root_device": root,
        "is_read_only": read_only,
        "cache_type": "Writeback",
        "io_engine": engine,
    })
}

fn boot(args: &str, drives: Value) -> Output {
    let out = run_guest(
        &guest_path("virtio_blk"),
        &json!({
            "boot-source": {"boot_args": format!("console=ttyS0 {args}")},
            "drives": drives,
        }),
    )
    .expect("run ember");
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.lines().any(|l| l == "virtio_blk done"),
        "the guest did not finish\n{out}"
    );
    out
}

/// The guest's `blk<n>: ` lines for device `n`, without the prefix.
fn device_lines(out: &Output, n: usize) -> Vec<String> {
    let prefix = format!("blk{n}: ");
    out.stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

/// Offered and accepted feature words from the `features` line.
fn features(lines: &[String], out: &Output) -> (u64, u64) {
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("features offered "))
        .unwrap_or_else(|| panic!("no features line\n{out}"));
    let (offered, accepted) = line.split_once(" accepted ").expect("features line format");
    (hex(offered), hex(accepted))
}

fn assert_lines_in_order(lines: &[String], want: &[String], out: &Output) {
    let mut pos = 0;
    for w in want {
        match lines[pos..].iter().position(|l| l == w) {
            Some(i) => pos += i + 1,
            None => panic!("missing (or out of order) line {w:?} in {lines:#?}\n{out}"),
        }
    }
}

fn basic_args(discover: &str, seed: u64) -> String {
    format!(
        "discover={discover} blk.test=basic blk.seed={seed} blk.sector={IO_SECTOR} \
         blk.sectors={IO_SECTORS} blk.discard={DISCARD_SECTOR} \
         blk.discard_sectors={DISCARD_SECTORS} blk.zero={ZERO_SECTOR} \
         blk.zero_sectors={ZERO_SECTORS}"
    )
}

/// Boots the guest on a fresh writable image and checks the report and the
/// file.
fn basic_io(engine: &str, discover: &str) {
    let images = Images::new();
    let image = images.sparse("data.img", IMAGE_SECTORS);
    // Real data where the guest will discard and write zeroes, so there
    // are blocks to free, and in a range nobody touches.
    let filler = vec![0x5au8; (DISCARD_SECTORS * SECTOR) as usize];
    write_at(&image, DISCARD_SECTOR, &filler);
    write_at(
        &image,
        ZERO_SECTOR,
        &filler[..(ZERO_SECTORS * SECTOR) as usize],
    );
    let untouched = pattern_bytes(99, UNTOUCHED_SECTOR, UNTOUCHED_SECTORS);
    write_at(&image, UNTOUCHED_SECTOR, &untouched);
    let blocks_before = fs::metadata(&image).unwrap().blocks();

    let seed = 7;
    let out = boot(
        &basic_args(discover, seed),
        json!([drive("data0", &image, engine, false, false)]),
    );
    if discover == "acpi" {
        assert!(
            out.stdout.lines().any(|l| l == "acpi rsdp 0xe0000"),
            "{out}"
        );
    }
    let lines = device_lines(&out, 0);
    let (offered, accepted) = features(&lines, &out);
    for bit in [F_VERSION_1, F_FLUSH, F_DISCARD, F_WRITE_ZEROES] {
        assert_ne!(offered & 1 << bit, 0, "feature {bit} not offered\n{out}");
    }
    assert_eq!(offered & 1 << F_RO, 0, "{out}");
    assert_eq!(accepted, offered & WANTED, "{out}");

    let end = IMAGE_SECTORS - 4;
    let want: Vec<String> = [
        "mmio 0xc0001000 gsi 5".to_string(),
        "queue 0 size 256 status 0xf".to_string(),
        format!("capacity {IMAGE_SECTORS} blk_size 512 seg_max 128"),
        "interrupt status 0x1 after ack 0x0".to_string(),
        "get_id ok id data0".to_string(),
        format!("write {IO_SECTOR}+{IO_SECTORS} ok"),
        format!("read {IO_SECTOR}+{IO_SECTORS} ok match"),
        "flush ok".to_string(),
        format!("discard {DISCARD_SECTOR}+{DISCARD_SECTORS} ok"),
        format!("read {DISCARD_SECTOR}+{DISCARD_SECTORS} ok zero"),
        format!("write_zeroes {ZERO_SECTOR}+{ZERO_SECTORS} ok"),
        format!("read {ZERO_SECTOR}+{ZERO_SECTORS} ok zero"),
        format!("read_past_end {end}+8 ioerr"),
        "done".to_string(),
    ]
    .into();
    assert_lines_in_order(&lines, &want, &out);

    // The host file: the pattern where the guest wrote it, zeroes where it
    // discarded and wrote zeroes, the rest as it was, the size unchanged.
    assert_eq!(
        read_at(&image, IO_SECTOR, IO_SECTORS),
        pattern_bytes(seed, IO_SECTOR, IO_SECTORS),
        "{out}"
    );
    assert!(
        read_at(&image, DISCARD_SECTOR, DISCARD_SECTORS)
            .iter()
            .all(|b| *b == 0),
        "discarded range is not zero\n{out}"
    );
    assert!(
        read_at(&image, ZERO_SECTOR, ZERO_SECTORS)
            .iter()
            .all(|b| *b == 0),
        "write-zeroes range is not zero\n{out}"
    );
    assert_eq!(
        read_at(&image, UNTOUCHED_SECTOR, UNTOUCHED_SECTORS),
        untouched
    );
    let meta = fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), IMAGE_SECTORS * SECTOR);
    // The discard punched a hole: 128 KiB fewer allocated 512-byte blocks
    // (the guest's write added at most 8 KiB).
    assert!(
        meta.blocks() + DISCARD_SECTORS - IO_SECTORS <= blocks_before,
        "st_blocks {} -> {}: the discard freed nothing\n{out}",
        blocks_before,
        meta.blocks()
    );
}

#[test]
fn basic_io_sync_engine() {
    basic_io("Sync", "cmdline");
}

#[test]
fn basic_io_async_engine() {
    basic_io("Async", "cmdline");
}

#[test]
fn basic_io_with_acpi_discovery() {
    basic_io("Sync", "acpi");
}

/// A read-only drive: RO offered, no discard or write zeroes, reads work,
/// the write fails with IOERR and the file stays byte-identical.
fn read_only(engine: &str) {
    let images = Images::new();
    let image = images.sparse("ro.img", IMAGE_SECTORS);
    let seed = 9;
    write_at(
        &image,
        IO_SECTOR,
        &pattern_bytes(seed, IO_SECTOR, IO_SECTORS),
    );
    let before = fs::read(&image).unwrap();
    let mtime_before = fs::metadata(&image).unwrap().modified().unwrap();

    let out = boot(
        &format!(
            "blk.test=readonly blk.seed={seed} blk.sector={IO_SECTOR} blk.sectors={IO_SECTORS}"
        ),
        json!([drive("ro0", &image, engine, true, false)]),
    );
    let lines = device_lines(&out, 0);
    let (offered, accepted) = features(&lines, &out);
    assert_ne!(offered & 1 << F_RO, 0, "RO not offered\n{out}");
    assert_eq!(offered & (1 << F_DISCARD | 1 << F_WRITE_ZEROES), 0, "{out}");
    assert_eq!(accepted, offered & WANTED, "{out}");
    let end = IMAGE_SECTORS - 4;
    let want: Vec<String> = [
        "get_id ok id ro0".to_string(),
        format!("read {IO_SECTOR}+{IO_SECTORS} ok match"),
        format!("write {IO_SECTOR}+{IO_SECTORS} ioerr"),
        format!("read {IO_SECTOR}+{IO_SECTORS} ok match"),
        "flush ok".to_string(),
        format!("read_past_end {end}+8 ioerr"),
        "done".to_string(),
    ]
    .into();
    assert_lines_in_order(&lines, &want, &out);
    assert!(!lines.iter().any(|l| l.starts_with("discard")), "{out}");
    assert!(
        fs::read(&image).unwrap() == before,
        "the read-only image changed\n{out}"
    );
    assert_eq!(
        fs::metadata(&image).unwrap().modified().unwrap(),
        mtime_before
    );
}

#[test]
fn read_only_drive_refuses_writes_sync_engine() {
    read_only("Sync");
}

#[test]
fn read_only_drive_refuses_writes_async_engine() {
    read_only("Async");
}

/// Root and data drives: the root drive is attached first whatever the
/// config order (Firecracker's rule), at 0xC000_1000 / GSI 5, the data
/// drive at 0xC000_2000 / GSI 6; both discovery paths agree and each
/// GET_ID returns its own drive_id.
#[test]
fn root_and_data_drives_get_firecracker_slots() {
    let images = Images::new();
    let root = images.sparse("root.img", 8192);
    let data = images.sparse("data.img", IMAGE_SECTORS);
    let drives = json!([
        drive("scratch", &data, "Sync", false, false),
        drive("rootfs", &root, "Async", true, true),
    ]);
    for discover in ["cmdline", "acpi"] {
        let out = boot(&basic_args(discover, 3), drives.clone());
        let cmdline = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("cmdline "))
            .unwrap_or_else(|| panic!("no cmdline line\n{out}"));
        let words: Vec<&str> = cmdline.split(' ').collect();
        let pos = |w: &str| {
            words
                .iter()
                .position(|x| *x == w)
                .unwrap_or_else(|| panic!("{w} not on the command line {cmdline:?}"))
        };
        assert!(
            pos("virtio_mmio.device=4K@0xc0001000:5") < pos("virtio_mmio.device=4K@0xc0002000:6")
        );
        assert_eq!(pos("root=/dev/vda") + 1, pos("ro"), "{cmdline}");
        assert!(
            out.stdout.lines().any(|l| l == "virtio-mmio devices 2"),
            "{out}"
        );

        let root_lines = device_lines(&out, 0);
        let data_lines = device_lines(&out, 1);
        for (lines, mmio, id) in [
            (&root_lines, "mmio 0xc0001000 gsi 5", "get_id ok id rootfs"),
            (&data_lines, "mmio 0xc0002000 gsi 6", "get_id ok id scratch"),
        ] {
            assert_lines_in_order(
                lines,
                &[mmio.to_string(), id.to_string(), "done".to_string()],
                &out,
            );
        }
        assert!(
            root_lines.contains(&format!("write {IO_SECTOR}+{IO_SECTORS} ioerr")),
            "{discover}: the read-only root took a write\n{out}"
        );
        assert!(
            data_lines.contains(&format!("read {IO_SECTOR}+{IO_SECTORS} ok match")),
            "{discover}\n{out}"
        );
    }
    // The data drive got the pattern (seed 3), the root drive nothing.
    assert_eq!(
        read_at(&data, IO_SECTOR, IO_SECTORS),
        pattern_bytes(3, IO_SECTOR, IO_SECTORS)
    );
    assert!(fs::read(&root).unwrap().iter().all(|b| *b == 0));
}

/// The guest's benchmark (sequential 128 KiB reads and writes of
/// `blk.mib`, then `blk.ops` random 4 KiB reads twice), whose bytes a
/// limiter must pace.
const LIMITED_ARGS: &str =
    "blk.test=bench blk.mib=2 blk.bs=131072 blk.qd=4 blk.ops=16 blk.rbs=4096";
/// Bytes that benchmark moves: 2 MiB read, 2 MiB written, 2 x 16 x 4 KiB.
const LIMITED_BYTES: u64 = (4 << 20) + 2 * 16 * 4096;

fn bench_bytes(out: &Output) -> u64 {
    let lines = device_lines(out, 0);
    lines
        .iter()
        .filter(|l| l.starts_with("bench ") && l.contains(" tsc "))
        .map(|l| {
            assert!(!l.contains("timeout"), "{l}\n{out}");
            assert!(l.contains(" errors 0"), "{l}\n{out}");
            let words: Vec<&str> = l.split(' ').collect();
            let i = words.iter().position(|w| *w == "bytes").unwrap();
            words[i + 1].parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn a_bandwidth_limited_drive_moves_no_more_than_its_bucket_allows() {
    let images = Images::new();
    let image = images.sparse("limited.img", IMAGE_SECTORS);
    let mut d = drive("limited", &image, "Sync", false, false);
    // 1 MiB/s: a 512 KiB bucket refilled every 500 ms.
    d["rate_limiter"] = json!({"bandwidth": {"size": 512 * 1024, "refill_time": 500}});
    let out = boot(LIMITED_ARGS, json!([d]));
    assert_eq!(bench_bytes(&out), LIMITED_BYTES);
    // All but the first, full bucket waits for refills: at least 3.5 s.
    let floor = Duration::from_secs_f64((LIMITED_BYTES - 512 * 1024) as f64 / (1 << 20) as f64);
    assert!(out.wall >= floor, "{:?} < {floor:?}\n{out}", out.wall);
    assert!(out.wall < Duration::from_secs(60), "{:?}\n{out}", out.wall);

    // The same run unlimited is far below that floor: the limit is what
    // made it slow.
    let free = boot(
        LIMITED_ARGS,
        json!([drive("free", &image, "Sync", false, false)]),
    );
    assert_eq!(bench_bytes(&free), LIMITED_BYTES);
    assert!(free.wall < floor / 2, "{:?}\n{free}", free.wall);
}

#[test]
fn an_ops_limited_drive_serves_no_more_requests_than_its_bucket_allows() {
    let images = Images::new();
    let image = images.sparse("ops.img", IMAGE_SECTORS);
    let mut d = drive("ops", &image, "Async", false, false);
    // 20 requests per second, with a one-time burst of 10 on top.
    d["rate_limiter"] = json!({"ops": {"size": 20, "refill_time": 1000, "one_time_burst": 10}});
    let out = boot(LIMITED_ARGS, json!([d]));
    assert_eq!(bench_bytes(&out), LIMITED_BYTES);
    // GET_ID, 16 + 16 sequential and 2 x 16 random requests: 65, of which
    // 30 go at once and 35 wait for 1.75 s of refill.
    assert!(
        out.wall >= Duration::from_millis(1750),
        "{:?}\n{out}",
        out.wall
    );
    assert!(out.wall < Duration::from_secs(60), "{:?}\n{out}", out.wall);
}

#[test]
fn a_polling_driver_at_queue_depth_one_never_waits_for_a_lost_kick() {
    // The guest posts each request while the device may be draining the
    // ring with notifications off; it skips its kick then, so the device
    // must find the request itself when it turns notifications back on,
    // even in a pass that popped nothing. A missed request stalls the
    // guest until the run's time limit. The window is a race: one boot of
    // 2 x 32768 requests at queue depth 1 hit it about half the time with
    // the device that missed it, so each engine boots four times.
    let images = Images::new();
    let image = images.sparse("qd1.img", IMAGE_SECTORS);
    for engine in [
        "Sync", "Async", "Sync", "Async", "Sync", "Async", "Sync", "Async",
    ] {
        let out = boot(
            "blk.test=bench blk.mib=1 blk.bs=131072 blk.qd=1 blk.ops=32768 blk.rbs=4096",
            json!([drive("qd1", &image, engine, false, false)]),
        );
        let phases = phase_errors(&out);
        assert_eq!(phases.len(), 4, "{engine}\n{out}");
        assert!(phases.iter().all(|(_, e)| *e == 0), "{engine}\n{out}");
    }
}

/// A tmpfs of `bytes` mounted on a temporary directory, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallFs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// `(phase, errors)` of each benchmark phase the guest reported.
fn phase_errors(out: &Output) -> Vec<(String, u64)> {
    device_lines(out, 0)
        .iter()
        .filter(|l| l.starts_with("bench ") && l.contains(" tsc "))
        .map(|l| {
            assert!(!l.contains("timeout"), "{l}\n{out}");
            let words: Vec<&str> = l.split(' ').collect();
            let i = words.iter().position(|w| *w == "errors").unwrap();
            (words[1].to_string(), words[i + 1].parse().unwrap())
        })
        .collect()
}

#[test]
fn a_drive_on_a_full_file_system_fails_writes_and_keeps_serving_reads() {
    for engine in ["Sync", "Async"] {
        // 1 MiB of room for an 8 MiB sparse image: the guest's 2 MiB of
        // sequential writes run out of space half way.
        let fs = SmallFs::new(1 << 20);
        let image = fs.path().join("full.img");
        File::create(&image)
            .unwrap()
            .set_len(IMAGE_SECTORS * SECTOR)
            .unwrap();
        let out = boot(
            LIMITED_ARGS,
            json!([drive("full", &image, engine, false, false)]),
        );
        let phases = phase_errors(&out);
        let errors = |name: &str| {
            phases
                .iter()
                .find(|(p, _)| p == name)
                .unwrap_or_else(|| panic!("no {name} phase\n{out}"))
                .1
        };
        // Each write request fails alone, with an I/O error the guest sees.
        let failed = errors("seqwrite");
        assert!(
            failed > 0 && failed < 16,
            "{engine}: {failed} of 16 writes failed\n{out}"
        );
        // Reads before and after, of data and of holes, all succeed; the
        // guest finished (boot() checked it), so the VMM kept serving.
        assert_eq!(errors("seqread"), 0, "{engine}\n{out}");
        assert_eq!(errors("randread"), 0, "{engine}\n{out}");
        assert_eq!(errors("randread_qd1"), 0, "{engine}\n{out}");
    }
}
