// SPDX-License-Identifier: Apache-2.0

//! The rlimits the jailer installs before exec (`--resource-limit`).
//!
//! As Firecracker, the number of open files is always bounded (2048 unless
//! `no-file` says otherwise) and the file size only when `fsize` is given.
//! Soft and hard limits are set to the same value, so the jailed process
//! cannot raise them again.

use std::io;

/// `no-file` when `--resource-limit no-file=...` is absent (Firecracker's `NO_FILE`).
pub const DEFAULT_NO_FILE: u64 = 2048;

/// A resource `--resource-limit` can bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `fsize`: `RLIMIT_FSIZE`, the largest file the process may create, in bytes.
    Fsize,
    /// `no-file`: `RLIMIT_NOFILE`, one more than the largest file descriptor number.
    NoFile,
}

impl Resource {
    /// The resource named `name` on the command line (`fsize`, `no-file`).
    pub fn from_arg(name: &str) -> Option<Self> {
        match name {
            "fsize" => Some(Self::Fsize),
            "no-file" => Some(Self::NoFile),
            _ => None,
        }
    }

    /// The name used on the command line.
    pub fn arg_name(self) -> &'static str {
        match self {
            Self::Fsize => "fsize",
            Self::NoFile => "no-file",
        }
    }

    fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            Self::Fsize => libc::RLIMIT_FSIZE,
            Self::NoFile => libc::RLIMIT_NOFILE,
        }
    }
}

/// `setrlimit` failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set resource limit {}={value}: {source}", resource.arg_name())]
pub struct RlimitError {
    /// The resource being limited.
    pub resource: Resource,
    /// The limit asked for.
    pub value: u64,
    /// Why `setrlimit` refused.
    #[source]
    pub source: io::Error,
}

/// The limits to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    fsize: Option<u64>,
    no_file: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            fsize: None,
            no_file: DEFAULT_NO_FILE,
        }
    }
}

impl ResourceLimits {
    /// Sets the limit of `resource` to `value` (the last one given wins).
    pub fn set(&mut self, resource: Resource, value: u64) {
        match resource {
            Resource::Fsize => self.fsize = Some(value),
            Resource::NoFile => self.no_file = value,
        }
    }

    /// The file size limit, if one was given.
    pub fn fsize(&self) -> Option<u64> {
        self.fsize
    }

    /// The open-file limit.
    pub fn no_file(&self) -> u64 {
        self.no_file
    }

    /// Installs the limits on the calling process (inherited across exec).
    ///
    /// # Errors
    ///
    /// The first limit `setrlimit` refuses.
    pub fn install(&self) -> Result<(), RlimitError> {
        if let Some(fsize) = self.fsize {
            set_limit(Resource::Fsize, fsize)?;
        }
        set_limit(Resource::NoFile, self.no_file)
    }
}

fn set_limit(resource: Resource, value: u64) -> Result<(), RlimitError> {
    let rlim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `rlim` is a valid, initialised rlimit that outlives the call,
    // and `resource.raw()` is one of the RLIMIT_* constants.
    let ret = unsafe { libc::setrlimit(resource.raw(), &rlim) };
    if ret != 0 {
        return Err(RlimitError {
            resource,
            value,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for r in [Resource::Fsize, Resource::NoFile] {
            assert_eq!(Resource::from_arg(r.arg_name()), Some(r));
        }
        assert_eq!(Resource::from_arg("nofile"), None);
    }

    #[test]
    fn a_limit_above_the_system_ceiling_is_reported() {
        // A value above fs.nr_open is refused even to root, so the error
        // path runs without changing this process's limits.
        let err = set_limit(Resource::NoFile, u64::MAX - 1).unwrap_err();
        assert_eq!(err.resource, Resource::NoFile);
        assert!(err
            .to_string()
            .starts_with("cannot set resource limit no-file="));
    }
}
