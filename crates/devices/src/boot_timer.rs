//! Firecracker's boot timer: with `--boot-timer`, a guest that writes the
//! byte 123 at the first MMIO address (0xC000_0000) makes the VMM log how
//! long the boot took, in wall and CPU time.

use std::time::Instant;

/// Size of the boot timer's MMIO slot.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

/// The value the guest writes when it has booted.
pub const MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE: u8 = 123;

/// The boot timer pseudo-device.
pub struct BootTimer {
    start: Instant,
    start_cpu_us: u64,
    reported: Option<(u128, u64)>,
}

/// CPU time used by this process so far, in microseconds.
pub fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

impl BootTimer {
    /// A timer counting from `start` (wall) and `start_cpu_us` (CPU).
    pub fn new(start: Instant, start_cpu_us: u64) -> Self {
        Self {
            start,
            start_cpu_us,
            reported: None,
        }
    }

    /// The wall and CPU microseconds reported by the last boot signal.
    pub fn reported(&self) -> Option<(u128, u64)> {
        self.reported
    }
}

impl ember_bus::BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // Only a one-byte write of the magic value at offset 0 counts.
        if offset != 0 || data != [MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE] {
            return;
        }
        let wall_us = self.start.elapsed().as_micros();
        let cpu_us = process_cpu_us().saturating_sub(self.start_cpu_us);
        self.reported = Some((wall_us, cpu_us));
        log::info!(
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            wall_us,
            wall_us / 1000,
            cpu_us,
            cpu_us / 1000
        );
    }
}

#[cfg(test)]
mod tests {
    use ember_bus::BusDevice;

    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_reports() {
        let mut t = BootTimer::new(Instant::now(), process_cpu_us());
        t.write(0, 1, &[123]);
        t.write(0, 0, &[122]);
        t.write(0, 0, &[123, 0]);
        assert_eq!(t.reported(), None);
        t.write(0, 0, &[123]);
        assert!(t.reported().is_some());
    }
}
