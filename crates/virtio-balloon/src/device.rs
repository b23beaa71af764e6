// SPDX-License-Identifier: Apache-2.0

//! The balloon device: its queues, its configuration space, the statistics
//! timer, free page hinting runs, and the updates the API makes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ember_virtio::{
    drain_eventfd, needs_interrupt, pop_or_enable_notification, ActivateError, ActiveQueue,
    InterruptKind, Registrations, VirtioConfig, VirtioDevice, VirtioInterrupt,
};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::metrics::BalloonMetrics;
use crate::parse::{
    parse_pfns, parse_ranges, parse_stats, pfn_ranges, BalloonStats, HintChain, HINT_CMD_DONE,
    HINT_CMD_STOP,
};
use crate::release::release;
use crate::{
    mib_to_pages, pages_to_mib, BalloonConfig, Error, CONFIG_SPACE_SIZE, MAX_PFNS_PER_CHAIN,
    PAGE_SHIFT, QUEUE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};

/// Most PFNs gathered from inflate chains before they are released: 32
/// chains of Linux's 256 (32 MiB of pages), in a bounded buffer (32 KiB).
pub const INFLATE_BATCH_PFNS: usize = 32 * MAX_PFNS_PER_CHAIN;

/// Index of the inflate queue.
pub(crate) const INFLATE: usize = 0;
/// Index of the deflate queue.
pub(crate) const DEFLATE: usize = 1;

/// Offsets of the configuration fields (virtio 1.2 §5.5.4).
const NUM_PAGES: usize = 0;
const ACTUAL: usize = 4;
const HINT_CMD_ID: usize = 8;

/// `PATCH /balloon/hinting/start`: starts a free page hinting run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartHintingCmd {
    /// Tell the driver the host is done with the hinted pages as soon as
    /// the driver ends the run (Firecracker's default), instead of waiting
    /// for `PATCH /balloon/hinting/stop`.
    #[serde(default = "default_true")]
    pub acknowledge_on_stop: bool,
}

fn default_true() -> bool {
    true
}

impl Default for StartHintingCmd {
    fn default() -> Self {
        StartHintingCmd {
            acknowledge_on_stop: true,
        }
    }
}

/// `GET /balloon/hinting/status`: the last command id the host gave and
/// the last one the driver sent back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingStatus {
    /// The command id in the configuration space.
    pub host_cmd: u32,
    /// The last command id the driver sent, if any.
    pub guest_cmd: Option<u32>,
}

/// The state of free page hinting runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintingState {
    /// The command id the host gave (STOP when no run was started).
    pub host_cmd: u32,
    /// The id of the last run started (ids 0 and 1 are reserved).
    pub last_cmd_id: u32,
    /// The last command id the driver sent.
    pub guest_cmd: Option<u32>,
    /// Send DONE as soon as the driver stops a run.
    pub acknowledge_on_finish: bool,
}

/// What an activated device holds.
pub(crate) struct Active {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queues: Vec<Queue>,
    pub(crate) notify: Vec<EventFd>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio memory balloon (virtio 1.2 §5.5).
pub struct Balloon {
    pub(crate) virtio: VirtioConfig,
    queue_sizes: Vec<u16>,
    pub(crate) stats_idx: Option<usize>,
    pub(crate) hint_idx: Option<usize>,
    pub(crate) report_idx: Option<usize>,
    metrics: Arc<BalloonMetrics>,
    pub(crate) stats_polling_interval_s: u16,
    stats_timer: TimerFd,
    /// The statistics chain the device holds until the next poll.
    pub(crate) stats_desc: Option<u16>,
    pub(crate) latest_stats: BalloonStats,
    pub(crate) hinting: HintingState,
    pfns: Vec<u32>,
    /// PFNs of inflate chains gathered for one release.
    batch: Vec<u32>,
    ranges: Vec<(GuestAddress, u64)>,
    pub(crate) active: Option<Active>,
    /// Signalled at activation and reset, so that the event loop starts or
    /// stops watching the queues.
    pub(crate) control_evt: EventFd,
    /// Whether the device was added to an event loop.
    pub(crate) subscribed: bool,
    /// What the event loop watches for the current activation, and the
    /// notify EventFds of a previous one until it has stopped watching them.
    pub(crate) registrations: Registrations,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config())
            .field("actual_pages", &self.actual_pages())
            .field("acked_features", &self.virtio.acked_features())
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    // Non-blocking: a read after the timer was re-armed must not stall the
    // event loop.
    // SAFETY: F_GETFL/F_SETFL on a descriptor this device owns.
    let ok = unsafe {
        let fd = timer.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

impl Balloon {
    /// A balloon as `config` describes it. A target beyond 32 bits of
    /// pages is refused; the check against guest memory is the caller's
    /// before boot and [`update_size`](Self::update_size)'s after.
    pub fn new(config: &BalloonConfig) -> Result<Balloon, Error> {
        let num_pages = mib_to_pages(config.amount_mib)?;
        let mut features = 1u64 << VIRTIO_F_VERSION_1;
        // Queue order is fixed by the spec (virtio 1.2 §5.5.2): inflate,
        // deflate, then each optional queue only when its feature is
        // offered.
        let mut next = 2usize;
        let mut take = |on: bool, bit: u32| {
            if !on {
                return None;
            }
            features |= 1u64 << bit;
            next += 1;
            Some(next - 1)
        };
        let stats_idx = take(
            config.stats_polling_interval_s > 0,
            VIRTIO_BALLOON_F_STATS_VQ,
        );
        let hint_idx = take(config.free_page_hinting, VIRTIO_BALLOON_F_FREE_PAGE_HINT);
        let report_idx = take(config.free_page_reporting, VIRTIO_BALLOON_F_REPORTING);
        if config.deflate_on_oom {
            features |= 1u64 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        let mut space = vec![0u8; CONFIG_SPACE_SIZE];
        space[NUM_PAGES..NUM_PAGES + 4].copy_from_slice(&num_pages.to_le_bytes());
        space[HINT_CMD_ID..HINT_CMD_ID + 4].copy_from_slice(&HINT_CMD_STOP.to_le_bytes());
        Ok(Balloon {
            virtio: VirtioConfig::new(features, space),
            queue_sizes: vec![QUEUE_SIZE; next],
            stats_idx,
            hint_idx,
            report_idx,
            metrics: Arc::new(BalloonMetrics::default()),
            stats_polling_interval_s: config.stats_polling_interval_s,
            stats_timer: nonblocking_timer().map_err(Error::EventFd)?,
            stats_desc: None,
            latest_stats: BalloonStats::default(),
            hinting: HintingState::default(),
            pfns: Vec::with_capacity(MAX_PFNS_PER_CHAIN),
            batch: Vec::new(),
            ranges: Vec::new(),
            active: None,
            control_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?,
            subscribed: false,
            registrations: Registrations::new(),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// Whether the driver started the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn config_u32(&self, offset: usize) -> u32 {
        let s = self.virtio.config_space();
        u32::from_le_bytes([s[offset], s[offset + 1], s[offset + 2], s[offset + 3]])
    }

    fn set_config_u32(&mut self, offset: usize, val: u32) {
        self.virtio.config_space_mut()[offset..offset + 4].copy_from_slice(&val.to_le_bytes());
    }

    /// The target, in 4 KiB pages (`num_pages`).
    pub fn num_pages(&self) -> u32 {
        self.config_u32(NUM_PAGES)
    }

    /// The pages the driver says the balloon holds (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.config_u32(ACTUAL)
    }

    /// Whether free page hinting is offered.
    pub fn free_page_hinting(&self) -> bool {
        self.hint_idx.is_some()
    }

    /// Whether statistics are polled.
    pub fn stats_enabled(&self) -> bool {
        self.stats_polling_interval_s > 0
    }

    /// The configuration as `GET /balloon` shows it: the current target in
    /// MiB and the settings the device was built with.
    pub fn config(&self) -> BalloonConfig {
        let offered = self.virtio.avail_features();
        BalloonConfig {
            amount_mib: pages_to_mib(self.num_pages()),
            deflate_on_oom: offered & (1u64 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM) != 0,
            stats_polling_interval_s: self.stats_polling_interval_s,
            free_page_hinting: self.hint_idx.is_some(),
            free_page_reporting: self.report_idx.is_some(),
        }
    }

    /// The notify EventFds of the running device, with their queue index.
    pub fn queue_events(&self) -> impl Iterator<Item = (usize, &EventFd)> {
        self.active.iter().flat_map(|a| a.notify.iter().enumerate())
    }

    /// The statistics timer, readable when a poll is due.
    pub fn stats_timer_fd(&self) -> RawFd {
        self.stats_timer.as_raw_fd()
    }

    fn trigger(&self, kind: InterruptKind) -> Result<(), Error> {
        let Some(active) = &self.active else {
            return Err(Error::DeviceNotActive);
        };
        active.interrupt.trigger(kind).map_err(|e| {
            self.metrics.event_fails.inc();
            Error::Interrupt(e)
        })
    }

    /// Sets a new target (`PATCH /balloon`) and tells the driver with a
    /// configuration interrupt. Only on a running device; a target above
    /// guest memory is refused.
    pub fn update_size(&mut self, amount_mib: u32) -> Result<(), Error> {
        let Some(active) = &self.active else {
            return Err(Error::DeviceNotActive);
        };
        let mem_mib = active.mem.iter().map(|r| r.len()).sum::<u64>() >> 20;
        if u64::from(amount_mib) > mem_mib {
            return Err(Error::TooMuchMemoryRequested(amount_mib));
        }
        let pages = mib_to_pages(amount_mib)?;
        self.set_config_u32(NUM_PAGES, pages);
        self.trigger(InterruptKind::Config)
    }

    /// Changes the statistics polling interval (`PATCH /balloon/statistics`).
    /// Statistics cannot be turned on or off once built: the queue is there
    /// or not. The held statistics buffer goes back at once, so that fresh
    /// numbers arrive without waiting out the old interval.
    pub fn update_stats_polling_interval(&mut self, interval_s: u16) -> Result<(), Error> {
        if self.stats_polling_interval_s == interval_s {
            return Ok(());
        }
        if self.stats_polling_interval_s == 0 || interval_s == 0 {
            return Err(Error::StatisticsStateChange);
        }
        self.stats_polling_interval_s = interval_s;
        if self.active.is_some() {
            self.request_stats()?;
            self.arm_stats_timer()?;
        }
        Ok(())
    }

    /// Arms the statistics timer while the device runs with statistics,
    /// stops it otherwise. Called by the event loop after activation and
    /// reset.
    pub fn sync_stats_timer(&mut self) -> Result<(), Error> {
        if self.active.is_some() && self.stats_enabled() {
            self.arm_stats_timer()
        } else {
            self.stats_timer
                .clear()
                .map_err(|e| Error::EventFd(e.into()))
        }
    }

    fn arm_stats_timer(&mut self) -> Result<(), Error> {
        let every = Duration::from_secs(u64::from(self.stats_polling_interval_s));
        self.stats_timer
            .reset(every, Some(every))
            .map_err(|e| Error::EventFd(e.into()))
    }

    /// The guest's latest statistics with the balloon's target and size
    /// (`GET /balloon/statistics`).
    pub fn latest_stats(&self) -> Result<BalloonStats, Error> {
        if !self.stats_enabled() {
            return Err(Error::StatisticsDisabled);
        }
        let mut stats = self.latest_stats;
        stats.target_pages = self.num_pages();
        stats.actual_pages = self.actual_pages();
        stats.target_mib = pages_to_mib(stats.target_pages);
        stats.actual_mib = pages_to_mib(stats.actual_pages);
        Ok(stats)
    }

    fn set_hint_cmd(&mut self, cmd: u32) -> Result<(), Error> {
        if self.active.is_none() {
            return Err(Error::DeviceNotActive);
        }
        self.hinting.host_cmd = cmd;
        self.set_config_u32(HINT_CMD_ID, cmd);
        self.trigger(InterruptKind::Config)
    }

    /// Starts a free page hinting run with a new command id
    /// (`PATCH /balloon/hinting/start`).
    pub fn start_hinting(&mut self, cmd: StartHintingCmd) -> Result<(), Error> {
        if !self.free_page_hinting() {
            return Err(Error::HintingNotEnabled);
        }
        if self.active.is_none() {
            return Err(Error::DeviceNotActive);
        }
        // Ids 0 (STOP) and 1 (DONE) are reserved.
        let mut id = self.hinting.last_cmd_id.wrapping_add(1);
        if id <= HINT_CMD_DONE {
            id = 2;
        }
        self.hinting.acknowledge_on_finish = cmd.acknowledge_on_stop;
        self.hinting.last_cmd_id = id;
        self.set_hint_cmd(id)
    }

    /// The state of hinting (`GET /balloon/hinting/status`).
    pub fn hinting_status(&self) -> Result<HintingStatus, Error> {
        if !self.free_page_hinting() {
            return Err(Error::HintingNotEnabled);
        }
        Ok(HintingStatus {
            host_cmd: self.hinting.host_cmd,
            guest_cmd: self.hinting.guest_cmd,
        })
    }

    /// Tells the driver the host is done with the hinted pages
    /// (`PATCH /balloon/hinting/stop`): it may use them again.
    pub fn stop_hinting(&mut self) -> Result<(), Error> {
        if !self.free_page_hinting() {
            return Err(Error::HintingNotEnabled);
        }
        self.set_hint_cmd(HINT_CMD_DONE)
    }

    /// Handles a notification of queue `index`: clears its EventFd and
    /// processes that queue.
    pub fn handle_queue_event(&mut self, index: usize) -> Result<(), Error> {
        if let Some(evt) = self.active.as_ref().and_then(|a| a.notify.get(index)) {
            if let Err(e) = drain_eventfd(evt) {
                self.metrics.event_fails.inc();
                error!("virtio-balloon: failed to read queue {index}'s EventFd: {e}");
            }
        }
        self.process_queue(index)
    }

    /// Processes queue `index` (whatever kind it is); a no-op before
    /// activation or for an index the device does not have.
    pub fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        match index {
            INFLATE => self.process_inflate_queue(),
            DEFLATE => self.process_deflate_queue(),
            i if Some(i) == self.stats_idx => self.process_stats_queue(),
            i if Some(i) == self.hint_idx => self.process_hint_queue(),
            i if Some(i) == self.report_idx => self.process_report_queue(),
            _ => Ok(()),
        }
    }

    /// Handles the statistics timer: the held statistics buffer goes back
    /// to the driver, which refills it.
    pub fn handle_stats_timer(&mut self) -> Result<(), Error> {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer of 8 bytes from a
        // descriptor this device owns; the result is checked.
        let n = unsafe {
            libc::read(
                self.stats_timer.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
        if n != 8 {
            // Spurious: the timer was re-armed since it fired.
            return Ok(());
        }
        self.request_stats()
    }

    /// Gives the held statistics buffer back, asking the driver for fresh
    /// statistics (virtio 1.2 §5.5.6.3).
    pub fn request_stats(&mut self) -> Result<(), Error> {
        let (Some(active), Some(idx)) = (self.active.as_mut(), self.stats_idx) else {
            return Ok(());
        };
        let Some(head) = self.stats_desc.take() else {
            debug!("virtio-balloon: no statistics buffer to give back yet");
            return Ok(());
        };
        let queue = &mut active.queues[idx];
        if let Err(e) = queue.add_used(&active.mem, head, 0) {
            self.metrics.event_fails.inc();
            return Err(Error::Queue(e));
        }
        signal_used(active, idx, &self.metrics);
        Ok(())
    }

    /// Processes the inflate queue: every valid chain's pages are released
    /// to the host; every chain goes back with length 0.
    ///
    /// The PFNs of up to [`INFLATE_BATCH_PFNS`] pages are gathered across
    /// chains, sorted and merged, and released with one call per run of
    /// consecutive pages (each call is a TLB shootdown and a KVM MMU
    /// notifier round); the chains go back only after their pages are
    /// released, so the driver never sees a page acknowledged that the host
    /// still holds.
    pub fn process_inflate_queue(&mut self) -> Result<(), Error> {
        self.metrics.inflate_count.inc();
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let metrics = &self.metrics;
        let (pfns, batch) = (&mut self.pfns, &mut self.batch);
        let mem = &active.mem;
        let queue = &mut active.queues[INFLATE];
        queue
            .disable_notification(mem)
            .map_err(|e| metrics.event_fails.inc_and(Error::Queue(e)))?;
        let mut heads: Vec<u16> = Vec::new();
        let mut used_any = false;
        let mut result = Ok(());
        loop {
            let chain = match pop_or_enable_notification(queue, mem) {
                Ok(chain) => chain,
                Err(e) => {
                    // The driver published more entries than the queue holds.
                    metrics.event_fails.inc();
                    result = Err(Error::Queue(e));
                    None
                }
            };
            if let Some(chain) = &chain {
                heads.push(chain.head_index());
            }
            if let Some(chain) = chain.clone() {
                match parse_pfns(chain, mem, pfns) {
                    Ok(()) => batch.extend_from_slice(pfns),
                    Err(e) => {
                        metrics.event_fails.inc();
                        debug!("virtio-balloon: invalid inflate chain: {e}");
                    }
                }
            }
            let more = chain.is_some();
            if more && batch.len() + MAX_PFNS_PER_CHAIN <= INFLATE_BATCH_PFNS {
                continue;
            }
            for (pfn, count) in pfn_ranges(batch) {
                let addr = GuestAddress(pfn << PAGE_SHIFT);
                if let Err(e) = release(mem, addr, count << PAGE_SHIFT) {
                    metrics.event_fails.inc();
                    error!("virtio-balloon: {e}");
                }
            }
            batch.clear();
            for head in heads.drain(..) {
                if let Err(e) = queue.add_used(mem, head, 0) {
                    metrics.event_fails.inc();
                    error!("virtio-balloon: failed to add head {head} to the used ring: {e}");
                }
                used_any = true;
            }
            if !more {
                break;
            }
        }
        self.signal_if(used_any, INFLATE);
        result
    }

    /// Processes the deflate queue. The guest takes pages back simply by
    /// touching them (they were released, not unmapped), so the device
    /// only checks the list and returns the chain.
    pub fn process_deflate_queue(&mut self) -> Result<(), Error> {
        self.metrics.deflate_count.inc();
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (metrics, pfns) = (&self.metrics, &mut self.pfns);
        let mem = &active.mem;
        drain_queue(&mut active.queues[DEFLATE], mem, metrics, |chain| {
            if let Err(e) = parse_pfns(chain, mem, pfns) {
                metrics.event_fails.inc();
                debug!("virtio-balloon: invalid deflate chain: {e}");
            }
        })
        .map(|used| self.signal_if(used, DEFLATE))
    }

    /// Processes the statistics queue: takes the statistics of each chain
    /// and holds the chain until the next poll. A second chain while one is
    /// held returns the older one (the driver should not post two).
    pub fn process_stats_queue(&mut self) -> Result<(), Error> {
        let (Some(active), Some(idx)) = (self.active.as_mut(), self.stats_idx) else {
            return Ok(());
        };
        let mem = &active.mem;
        let queue = &mut active.queues[idx];
        queue
            .disable_notification(mem)
            .map_err(|e| self.metrics.event_fails.inc_and(Error::Queue(e)))?;
        let mut used_any = false;
        loop {
            let chain = match pop_or_enable_notification(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.metrics.event_fails.inc();
                    return Err(Error::Queue(e));
                }
            };
            self.metrics.stats_updates_count.inc();
            let head = chain.head_index();
            if let Some(prev) = self.stats_desc.replace(head) {
                warn!("virtio-balloon: the driver posted a second statistics buffer");
                if let Err(e) = queue.add_used(mem, prev, 0) {
                    self.metrics.event_fails.inc();
                    error!("virtio-balloon: cannot return statistics buffer {prev}: {e}");
                }
                used_any = true;
            }
            match parse_stats(chain, mem) {
                Ok(stats) => {
                    for (tag, val) in stats {
                        if !self.latest_stats.update(tag, val) {
                            self.metrics.stats_update_fails.inc();
                            debug!("virtio-balloon: unknown statistic tag {tag}");
                        }
                    }
                }
                Err(e) => {
                    self.metrics.stats_update_fails.inc();
                    self.metrics.event_fails.inc();
                    debug!("virtio-balloon: invalid statistics chain: {e}");
                }
            }
        }
        if used_any {
            signal_used(active, idx, &self.metrics);
        }
        Ok(())
    }

    /// Processes the free page reporting queue: every reported range is
    /// released to the host.
    pub fn process_report_queue(&mut self) -> Result<(), Error> {
        let (Some(active), Some(idx)) = (self.active.as_mut(), self.report_idx) else {
            return Ok(());
        };
        let (metrics, ranges) = (&self.metrics, &mut self.ranges);
        let mem = &active.mem;
        drain_queue(&mut active.queues[idx], mem, metrics, |chain| {
            if let Err(e) = parse_ranges(chain, mem, ranges) {
                metrics.free_page_report_fails.inc();
                metrics.event_fails.inc();
                debug!("virtio-balloon: invalid free page report: {e}");
                return;
            }
            for &(addr, len) in ranges.iter() {
                metrics.free_page_report_count.inc();
                match release(mem, addr, len) {
                    Ok(()) => metrics.free_page_report_freed.add(len),
                    Err(e) => {
                        metrics.free_page_report_fails.inc();
                        error!("virtio-balloon: {e}");
                    }
                }
            }
        })
        .map(|used| self.signal_if(used, idx))
    }

    /// Processes the free page hinting queue: command ids update the run's
    /// state; hinted ranges of the current run are released, others (an
    /// earlier run's, or after STOP/DONE) are returned untouched. When the
    /// driver stops a run started with `acknowledge_on_stop`, the host
    /// answers DONE at once.
    pub fn process_hint_queue(&mut self) -> Result<(), Error> {
        let (Some(active), Some(idx)) = (self.active.as_mut(), self.hint_idx) else {
            return Ok(());
        };
        let (metrics, hinting) = (&self.metrics, &mut self.hinting);
        let mem = &active.mem;
        let mut complete = false;
        let used = drain_queue(&mut active.queues[idx], mem, metrics, |chain| {
            let hint = match HintChain::parse(chain, mem) {
                Ok(hint) => hint,
                Err(e) => {
                    metrics.free_page_hint_fails.inc();
                    metrics.event_fails.inc();
                    debug!("virtio-balloon: invalid free page hint: {e}");
                    return;
                }
            };
            if let Some(cmd) = hint.cmd {
                hinting.guest_cmd = Some(cmd);
                complete = cmd == HINT_CMD_STOP || cmd == HINT_CMD_DONE;
            }
            let host = hinting.host_cmd;
            if host == HINT_CMD_STOP || host == HINT_CMD_DONE || hinting.guest_cmd != Some(host) {
                return;
            }
            for &(addr, len) in &hint.ranges {
                metrics.free_page_hint_count.inc();
                match release(mem, addr, len) {
                    Ok(()) => metrics.free_page_hint_freed.add(len),
                    Err(e) => {
                        metrics.free_page_hint_fails.inc();
                        error!("virtio-balloon: {e}");
                    }
                }
            }
        })?;
        self.signal_if(used, idx);
        if complete && self.hinting.acknowledge_on_finish {
            self.set_hint_cmd(HINT_CMD_DONE)?;
        }
        Ok(())
    }

    fn signal_if(&mut self, used: bool, idx: usize) {
        if let (true, Some(active)) = (used, self.active.as_mut()) {
            signal_used(active, idx, &self.metrics);
        }
    }
}

/// Small helper: count a failure and pass the error on.
trait IncAnd {
    fn inc_and<E>(&self, e: E) -> E;
}

impl IncAnd for ember_metrics::Counter {
    fn inc_and<E>(&self, e: E) -> E {
        self.inc();
        e
    }
}

/// Pops every chain of `queue`, hands it to `handle`, and returns it with
/// used length 0 (the balloon writes nothing into guest buffers). Returns
/// whether any chain was returned.
fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    metrics: &BalloonMetrics,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>),
) -> Result<bool, Error> {
    // No kicks while the ring is being drained (virtio 1.2 §2.7.10).
    queue
        .disable_notification(mem)
        .map_err(|e| metrics.event_fails.inc_and(Error::Queue(e)))?;
    let mut used_any = false;
    loop {
        let chain = match pop_or_enable_notification(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return Ok(used_any),
            Err(e) => {
                // The driver published more entries than the queue holds.
                metrics.event_fails.inc();
                return Err(Error::Queue(e));
            }
        };
        let head = chain.head_index();
        handle(chain);
        if let Err(e) = queue.add_used(mem, head, 0) {
            metrics.event_fails.inc();
            error!("virtio-balloon: failed to add head {head} to the used ring: {e}");
        }
        used_any = true;
    }
}

/// Interrupts the driver once for what was added to queue `idx`'s used
/// ring, unless it asked not to be.
fn signal_used(active: &mut Active, idx: usize, metrics: &BalloonMetrics) {
    match needs_interrupt(&mut active.queues[idx], &active.mem) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            // Better a spurious interrupt than a lost one.
            metrics.event_fails.inc();
            error!("virtio-balloon: cannot read the notification state: {e}");
        }
    }
    if let Err(e) = active.interrupt.trigger(InterruptKind::Vring) {
        metrics.event_fails.inc();
        error!("virtio-balloon: failed to signal the used-buffer interrupt: {e}");
    }
}

/// The queues in index order, exactly `0..count`.
fn order_queues(
    mut queues: Vec<ActiveQueue>,
    count: usize,
) -> Result<Vec<ActiveQueue>, ActivateError> {
    if queues.len() != count {
        return Err(ActivateError::QueueCount {
            expected: count,
            actual: queues.len(),
        });
    }
    queues.sort_by_key(|q| q.index);
    for (expected, q) in (0u16..).zip(&queues) {
        if q.index != expected {
            return Err(ActivateError::QueueNotReady(expected));
        }
    }
    Ok(queues)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.virtio.avail_features()
    }

    fn ack_features(&mut self, features: u64) {
        self.virtio.ack_features(features);
    }

    fn config_size(&self) -> u64 {
        self.virtio.config_size()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.virtio.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's to write (virtio 1.2 §5.5.4); the
        // target and the hint command id are the host's.
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(data.len()));
        match (start, end) {
            (Some(start), Some(end)) if start >= ACTUAL && end <= ACTUAL + 4 => {
                self.virtio.config_space_mut()[start..end].copy_from_slice(data);
            }
            _ => debug!(
                "virtio-balloon: driver wrote {} bytes of read-only configuration at {offset:#x}",
                data.len()
            ),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::AlreadyActivated);
        }
        let queues = order_queues(queues, self.queue_sizes.len())
            .inspect_err(|_| self.metrics.activate_fails.inc())?;
        if let Err(e) = self.control_evt.write(1) {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::Io(e));
        }
        let (queues, notify) = queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        self.active = Some(Active {
            mem,
            queues,
            notify,
            interrupt,
        });
        // The event loop arms the statistics timer when it picks up the
        // activation: this runs on a vCPU thread.
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            if self.subscribed {
                // The event loop may be watching them: they stay open until
                // it has unregistered them.
                for evt in active.notify {
                    self.registrations.retire(evt);
                }
                if let Err(e) = self.control_evt.write(1) {
                    self.metrics.event_fails.inc();
                    error!("virtio-balloon: cannot signal the reset to the event loop: {e}");
                }
            }
        }
        // The event loop stops the statistics timer when it picks up the
        // reset; until then a tick finds no device to poll.
        self.stats_desc = None;
        // A new driver starts with an empty balloon and no hinting run.
        self.set_config_u32(ACTUAL, 0);
        self.set_config_u32(HINT_CMD_ID, HINT_CMD_STOP);
        self.hinting.host_cmd = HINT_CMD_STOP;
        self.hinting.guest_cmd = None;
        self.virtio.reset();
        true
    }
}
