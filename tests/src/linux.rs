//! A real Linux kernel for boot-protocol tests: Debian's cloud kernel.
//!
//! [`debian_cloud_kernel`] downloads the current `linux-image-*-cloud-amd64`
//! package with `apt-get download`, unpacks it with `dpkg-deb -x`, keeps its
//! bzImage (`boot/vmlinuz-*`) and cuts the uncompressed ELF `vmlinux` out of
//! the bzImage's LZ4 payload with the `lz4` tool. Both are cached outside the
//! repository (`$EMBER_CACHE_DIR/linux`, else `~/.cache/ember/linux`) under
//! the package name, so later runs need neither the network nor apt.
//!
//! ```no_run
//! let kernel = ember_tests::linux::debian_cloud_kernel().unwrap();
//! println!("{} -> {}", kernel.package, kernel.vmlinux.display());
//! ```

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;

use crate::elf::{self, Elf64};
use crate::vm::TempDir;

/// The metapackage that depends on the current cloud kernel image.
const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Magic of the LZ4 legacy frame format, the one the kernel's `lz4 -l`
/// compression of `vmlinux.bin` produces (lz4 `doc/lz4_Frame_format.md`,
/// "Legacy frame").
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

// Setup header fields, Linux Documentation/arch/x86/boot.rst.
/// `setup_sects`: size of the real-mode setup in 512-byte sectors (0 means 4).
const SETUP_SECTS: usize = 0x1f1;
/// `header`: the "HdrS" magic.
const HEADER: usize = 0x202;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
/// `version`: boot protocol version; 2.08 added `payload_offset`/`payload_length`.
const VERSION: usize = 0x206;
/// `payload_offset`: payload start, relative to the protected-mode code.
const PAYLOAD_OFFSET: usize = 0x248;
/// `payload_length`: payload size, including the 4-byte uncompressed size
/// `size_append` adds after the compressed data.
const PAYLOAD_LENGTH: usize = 0x24c;

/// Errors from fetching or unpacking the kernel.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A tool could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error.
        stderr: String,
    },
    /// The `lz4` tool is not installed.
    #[error("the lz4 command is needed to decompress the kernel: apt-get install lz4")]
    Lz4Missing,
    /// apt does not know the kernel image package, even after `apt-get update`.
    #[error("cannot find the kernel image package in `apt-cache depends {0}`")]
    NoPackage(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The package has no `boot/vmlinuz-*`, or `apt-get download` left no `.deb`.
    #[error("no {what} in {dir}")]
    Missing {
        /// What was looked for.
        what: &'static str,
        /// Where.
        dir: PathBuf,
    },
    /// The file is not a bzImage with an LZ4 payload.
    #[error("not a bzImage with an LZ4 payload: {0}")]
    NotBzImage(String),
    /// The decompressed payload has the wrong size.
    #[error("decompressed vmlinux is {actual} bytes, the bzImage says {expected}")]
    SizeMismatch {
        /// Size recorded after the compressed payload.
        expected: u64,
        /// Size produced by lz4.
        actual: u64,
    },
    /// The decompressed payload is not an ELF64.
    #[error("decompressed vmlinux is not an ELF64: {0}")]
    Elf(#[from] elf::Error),
    /// The vmlinux has no PVH entry note.
    #[error("vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhNote,
}

/// A kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The Debian package it came from, e.g. `linux-image-6.1.0-48-cloud-amd64`.
    pub package: String,
    /// The compressed bzImage (`boot/vmlinuz-*`).
    pub bzimage: PathBuf,
    /// The uncompressed ELF vmlinux, which carries a PVH entry note.
    pub vmlinux: PathBuf,
}

/// Where kernels are cached: `$EMBER_CACHE_DIR/linux`, else
/// `$HOME/.cache/ember/linux`, else `<temp dir>/ember-cache/linux`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("EMBER_CACHE_DIR") {
        return PathBuf::from(dir).join("linux");
    }
    match env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/ember/linux"),
        None => env::temp_dir().join("ember-cache/linux"),
    }
}

/// The current Debian cloud kernel, downloaded and unpacked on first use.
///
/// Concurrent callers in one process share one download; concurrent
/// processes each download but publish with atomic renames. When apt cannot
/// name the current package (offline, no lists), a previously cached kernel
/// is used.
pub fn debian_cloud_kernel() -> Result<Kernel, FetchError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = cache_dir();
    let package = match cloud_kernel_package() {
        Ok(package) => package,
        Err(e) => return newest_cached(&cache).ok_or(e),
    };
    let kernel = cached(&cache, &package);
    if kernel.bzimage.is_file() && kernel.vmlinux.is_file() {
        return Ok(kernel);
    }
    download(&cache, &package)
}

/// Name of the package the cloud kernel metapackage depends on, read from
/// `apt-cache depends`; runs `apt-get update` once if apt does not know it.
/// `$EMBER_LINUX_PACKAGE` overrides it.
pub fn cloud_kernel_package() -> Result<String, FetchError> {
    if let Some(package) = env::var_os("EMBER_LINUX_PACKAGE") {
        return Ok(package.to_string_lossy().into_owned());
    }
    image_package(METAPACKAGE, "-cloud-amd64")
}

/// Name of the `linux-image-*<suffix>` package that `metapackage` depends
/// on, read from `apt-cache depends`; runs `apt-get update` once if apt
/// does not know it.
pub fn image_package(metapackage: &str, suffix: &str) -> Result<String, FetchError> {
    let depends = || -> Result<Option<String>, FetchError> {
        // apt-cache exits non-zero when it has no lists; that is the
        // "update first" case, not an error.
        let out = command_output(Command::new("apt-cache").args(["depends", metapackage]))?;
        Ok(parse_depends(&String::from_utf8_lossy(&out.stdout), suffix))
    };
    if let Some(package) = depends()? {
        return Ok(package);
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    depends()?.ok_or_else(|| FetchError::NoPackage(metapackage.to_string()))
}

/// The `linux-image-*<suffix>` dependency in `apt-cache depends` output.
fn parse_depends(text: &str, suffix: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| {
            p.strip_prefix("linux-image-")
                .and_then(|rest| rest.strip_suffix(suffix))
                .is_some_and(|version| {
                    !version.is_empty()
                        && version
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
                })
        })
        .map(str::to_string)
}

/// Files of the Debian package `package`, downloaded and unpacked on first
/// use and cached in `cache_dir()/<package>/files/`.
///
/// Each name is the file name of a file somewhere in the package (the first
/// one found); a name ending in `*` matches by prefix and is cached without
/// the `*`. Returns the cached paths in the order of `names`.
pub fn package_files(package: &str, names: &[&str]) -> Result<Vec<PathBuf>, FetchError> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    let cache = cache_dir();
    let dir = cache.join(package).join("files");
    let cached: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.join(n.trim_end_matches('*')))
        .collect();
    if cached.iter().all(|p| p.is_file()) {
        return Ok(cached);
    }
    fs::create_dir_all(&cache).map_err(io_err(&cache))?;
    let work = TempDir::new_in(&cache).map_err(io_err(&cache))?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(work.path()))?;
    let deb =
        find_file(work.path(), |n| n.ends_with(".deb"))?.ok_or_else(|| FetchError::Missing {
            what: "downloaded .deb",
            dir: work.path().to_path_buf(),
        })?;
    let root = work.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let staged = work.path().join("files");
    fs::create_dir(&staged).map_err(io_err(&staged))?;
    for name in names {
        let found = find_in_tree(&root, name)?.ok_or_else(|| FetchError::Missing {
            what: "a file named in package_files",
            dir: root.join(name),
        })?;
        let to = staged.join(name.trim_end_matches('*'));
        fs::rename(&found, &to).map_err(io_err(&to))?;
    }
    fs::create_dir_all(cache.join(package)).map_err(io_err(&cache))?;
    // Replace a stale entry that lacked some file; a concurrent process
    // publishing the same files is as good as ours.
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = fs::rename(&staged, &dir) {
        if !cached.iter().all(|p| p.is_file()) {
            return Err(FetchError::Io {
                path: dir,
                source: e,
            });
        }
    }
    Ok(cached)
}

/// The first file under `dir` (depth first) whose name is `name`, or starts
/// with it when `name` ends in `*`.
fn find_in_tree(dir: &Path, name: &str) -> Result<Option<PathBuf>, FetchError> {
    let entries = fs::read_dir(dir).map_err(|source| FetchError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut subdirs = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let matches = match name.strip_suffix('*') {
            Some(prefix) => file_name.starts_with(prefix),
            None => file_name == name,
        };
        let kind = entry.file_type().map_err(|source| FetchError::Io {
            path: path.clone(),
            source,
        })?;
        if kind.is_dir() {
            subdirs.push(path);
        } else if matches && kind.is_file() {
            return Ok(Some(path));
        }
    }
    for sub in subdirs {
        if let Some(found) = find_in_tree(&sub, name)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn cached(cache: &Path, package: &str) -> Kernel {
    let dir = cache.join(package);
    Kernel {
        package: package.to_string(),
        bzimage: dir.join("vmlinuz"),
        vmlinux: dir.join("vmlinux"),
    }
}

fn newest_cached(cache: &Path) -> Option<Kernel> {
    let mut names: Vec<String> = fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("linux-image-"))
        .collect();
    names.sort();
    names
        .iter()
        .rev()
        .map(|n| cached(cache, n))
        .find(|k| k.bzimage.is_file() && k.vmlinux.is_file())
}

fn download(cache: &Path, package: &str) -> Result<Kernel, FetchError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    fs::create_dir_all(cache).map_err(io_err(cache))?;
    // Work next to the cache so the final renames stay on one filesystem.
    let work = TempDir::new_in(cache).map_err(io_err(cache))?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(work.path()))?;
    let deb =
        find_file(work.path(), |n| n.ends_with(".deb"))?.ok_or_else(|| FetchError::Missing {
            what: "downloaded .deb",
            dir: work.path().to_path_buf(),
        })?;
    let root = work.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let vmlinuz =
        find_file(&boot, |n| n.starts_with("vmlinuz-"))?.ok_or_else(|| FetchError::Missing {
            what: "boot/vmlinuz-*",
            dir: root.clone(),
        })?;

    let bzimage = fs::read(&vmlinuz).map_err(io_err(&vmlinuz))?;
    let vmlinux = extract_vmlinux(&bzimage, work.path())?;
    let elf = Elf64::parse(&vmlinux)?;
    if !elf.has_pvh_note(&vmlinux) {
        return Err(FetchError::NoPvhNote);
    }

    let kernel = cached(cache, package);
    let dir = cache.join(package);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let staged_vmlinux = work.path().join("vmlinux");
    fs::write(&staged_vmlinux, &vmlinux).map_err(io_err(&staged_vmlinux))?;
    fs::rename(&vmlinuz, &kernel.bzimage).map_err(io_err(&kernel.bzimage))?;
    // The vmlinux is published last: its presence marks a complete entry.
    fs::rename(&staged_vmlinux, &kernel.vmlinux).map_err(io_err(&kernel.vmlinux))?;
    Ok(kernel)
}

/// The compressed payload of a bzImage, located through the setup header's
/// `payload_offset`/`payload_length` (boot protocol 2.08+), or by the LZ4
/// legacy magic for older headers. Includes the trailing 4-byte size.
pub fn bzimage_payload(bzimage: &[u8]) -> Result<&[u8], FetchError> {
    let u32_at = |off: usize| {
        bzimage
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bzimage.get(HEADER..HEADER + 4) != Some(HEADER_MAGIC.as_slice()) {
        return Err(FetchError::NotBzImage(format!(
            "no \"HdrS\" magic at {HEADER:#x}"
        )));
    }
    let version = bzimage
        .get(VERSION..VERSION + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let from_header = if version >= 0x208 {
        let setup_sects = match bzimage.get(SETUP_SECTS).copied().unwrap_or(0) {
            0 => 4,
            n => usize::from(n),
        };
        // The protected-mode kernel follows the boot sector and the setup sectors.
        let pm_start = (setup_sects + 1) * 512;
        match (u32_at(PAYLOAD_OFFSET), u32_at(PAYLOAD_LENGTH)) {
            (Some(off), Some(len)) => {
                let start = pm_start.checked_add(usize::try_from(off).unwrap_or(usize::MAX));
                let end = start.and_then(|s| s.checked_add(usize::try_from(len).ok()?));
                start.zip(end).and_then(|(s, e)| bzimage.get(s..e))
            }
            _ => None,
        }
    } else {
        None
    };
    let payload = match from_header {
        Some(p) => p,
        None => {
            let start = bzimage
                .windows(4)
                .position(|w| w == LZ4_LEGACY_MAGIC)
                .ok_or_else(|| FetchError::NotBzImage("no LZ4 legacy frame".to_string()))?;
            // Without payload_length the payload runs to the end of the file.
            &bzimage[start..]
        }
    };
    if !payload.starts_with(&LZ4_LEGACY_MAGIC) {
        return Err(FetchError::NotBzImage(format!(
            "payload starts with {:02x?}, not the LZ4 legacy magic",
            payload.get(..4).unwrap_or(payload)
        )));
    }
    if payload.len() < 8 {
        return Err(FetchError::NotBzImage(format!(
            "payload of {} bytes is too short",
            payload.len()
        )));
    }
    Ok(payload)
}

/// Decompresses the bzImage's LZ4 payload into the ELF vmlinux with the
/// `lz4` tool, using `work` for temporary files.
pub fn extract_vmlinux(bzimage: &[u8], work: &Path) -> Result<Vec<u8>, FetchError> {
    let payload = bzimage_payload(bzimage)?;
    // The kernel build appends the uncompressed size (le32) to the
    // compressed data; lz4 would read it as another block header.
    let (compressed, size) = payload.split_at(payload.len() - 4);
    let expected = u64::from(u32::from_le_bytes([size[0], size[1], size[2], size[3]]));

    match Command::new("lz4").arg("--version").output() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(FetchError::Lz4Missing),
        _ => {}
    }
    let input = work.join("vmlinux.bin.lz4");
    let output = work.join("vmlinux.bin");
    fs::write(&input, compressed).map_err(|source| FetchError::Io {
        path: input.clone(),
        source,
    })?;
    run(Command::new("lz4")
        .args(["-d", "-q", "-f"])
        .arg(&input)
        .arg(&output))?;
    let vmlinux = fs::read(&output).map_err(|source| FetchError::Io {
        path: output.clone(),
        source,
    })?;
    let actual = vmlinux.len() as u64;
    if actual != expected {
        return Err(FetchError::SizeMismatch { expected, actual });
    }
    Ok(vmlinux)
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>, FetchError> {
    let entries = fs::read_dir(dir).map_err(|source| FetchError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_str().is_some_and(&pred))
        .map(|e| e.path()))
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn command_output(cmd: &mut Command) -> Result<std::process::Output, FetchError> {
    cmd.output().map_err(|source| FetchError::Spawn {
        command: describe(cmd),
        source,
    })
}

fn run(cmd: &mut Command) -> Result<(), FetchError> {
    let out = command_output(cmd)?;
    if out.status.success() {
        return Ok(());
    }
    Err(FetchError::Command {
        command: describe(cmd),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_image_dependency() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n";
        assert_eq!(
            parse_depends(text, "-cloud-amd64").as_deref(),
            Some("linux-image-6.1.0-48-cloud-amd64")
        );
        assert_eq!(
            parse_depends("E: No packages found\n", "-cloud-amd64"),
            None
        );
        // The generic image: "-amd64" must not match the cloud package.
        assert_eq!(parse_depends(text, "-amd64"), None);
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_depends(text, "-amd64").as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
    }

    /// A fake bzImage: boot sector and `setup_sects` sectors, then the
    /// protected-mode part with `payload` at `payload_offset`.
    fn bzimage(version: u16, payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm_start = (usize::from(setup_sects) + 1) * 512;
        let payload_offset = 0x40usize;
        let mut f = vec![0u8; pm_start + payload_offset];
        f[SETUP_SECTS] = setup_sects;
        f[HEADER..HEADER + 4].copy_from_slice(HEADER_MAGIC);
        f[VERSION..VERSION + 2].copy_from_slice(&version.to_le_bytes());
        f[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4]
            .copy_from_slice(&(payload_offset as u32).to_le_bytes());
        f[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f.extend_from_slice(b"trailing decompressor data");
        f
    }

    #[test]
    fn payload_comes_from_the_setup_header() {
        let mut payload = LZ4_LEGACY_MAGIC.to_vec();
        payload.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let image = bzimage(0x20f, &payload);
        assert_eq!(bzimage_payload(&image).unwrap(), payload.as_slice());
    }

    #[test]
    fn old_headers_fall_back_to_the_lz4_magic() {
        let mut payload = LZ4_LEGACY_MAGIC.to_vec();
        payload.extend_from_slice(&[9; 8]);
        let image = bzimage(0x206, &payload);
        let found = bzimage_payload(&image).unwrap();
        assert!(found.starts_with(&payload));
    }

    #[test]
    fn rejects_non_bzimages_and_other_compressors() {
        assert!(matches!(
            bzimage_payload(b"\x7fELF not a bzImage"),
            Err(FetchError::NotBzImage(_))
        ));
        // gzip payload (1f 8b) where LZ4 is expected.
        let image = bzimage(0x20f, &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            bzimage_payload(&image),
            Err(FetchError::NotBzImage(m)) if m.contains("1f, 8b")
        ));
    }

    #[test]
    fn extract_vmlinux_round_trips_through_lz4() {
        let dir = TempDir::new().unwrap();
        let original: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let plain = dir.path().join("plain");
        fs::write(&plain, &original).unwrap();
        let packed = dir.path().join("plain.lz4");
        // -l: the legacy frame format, as the kernel build uses.
        run(Command::new("lz4")
            .args(["-l", "-q", "-f"])
            .arg(&plain)
            .arg(&packed))
        .unwrap();
        let mut payload = fs::read(&packed).unwrap();
        payload.extend_from_slice(&(original.len() as u32).to_le_bytes());
        let image = bzimage(0x20f, &payload);
        assert_eq!(extract_vmlinux(&image, dir.path()).unwrap(), original);

        // A wrong recorded size is caught.
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        let image = bzimage(0x20f, &payload);
        assert!(matches!(
            extract_vmlinux(&image, dir.path()),
            Err(FetchError::SizeMismatch { expected: 7, .. })
        ));
    }
}
