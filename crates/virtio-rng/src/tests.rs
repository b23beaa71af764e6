// SPDX-License-Identifier: Apache-2.0

//! Device tests against real guest memory and virtio-queue's
//! MockSplitQueue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_virtio::{ActivateError, ActiveQueue, Persist, VirtioDevice};
use ember_virtio_mmio::test_utils::{leaked_memory, DriverQueue, MockInterrupt};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    BucketSpec, ChainError, Entropy, EntropyConfig, EntropyState, EntropyStateError,
    RateLimiterConfig, Request, MAX_REQUEST_BYTES,
};

const MEM_SIZE: u64 = 0x40_0000;
/// Where tests put buffers.
const DATA: u64 = 0x10_0000;
const TABLE: u64 = 0x3_0000;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Harness {
    mem: &'static GuestMemoryMmap,
    q: DriverQueue,
    rng: Entropy,
    interrupt: Arc<MockInterrupt>,
}

fn new_memory() -> &'static GuestMemoryMmap {
    leaked_memory(MEM_SIZE as usize)
}

impl Harness {
    fn new(rate_limiter: RateLimiterConfig) -> Self {
        let mut h = Harness::inactive(rate_limiter);
        let features = h.rng.features();
        h.activate(features);
        h
    }

    fn inactive(rate_limiter: RateLimiterConfig) -> Self {
        let mem = new_memory();
        Harness {
            mem,
            q: DriverQueue::new(mem, 256),
            rng: Entropy::new(&EntropyConfig { rate_limiter }).unwrap(),
            interrupt: Arc::new(MockInterrupt::default()),
        }
    }

    fn activate(&mut self, features: u64) {
        self.rng.ack_features(features);
        let queue: Queue = self.q.vq.create_queue().unwrap();
        self.rng
            .activate(
                self.mem.clone(),
                vec![ActiveQueue {
                    index: 0,
                    queue,
                    notify: EventFd::new(EFD_NONBLOCK).unwrap(),
                }],
                self.interrupt.clone(),
            )
            .unwrap();
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<BucketSpec> {
    Some(BucketSpec {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

/// Bytes of `buf` equal to zero: random data has about 1 in 256.
fn zeroes(buf: &[u8]) -> usize {
    buf.iter().filter(|&&b| b == 0).count()
}

#[test]
fn features_type_and_config() {
    let rng = Entropy::new(&EntropyConfig::default()).unwrap();
    assert_eq!(rng.device_type(), 4);
    assert_eq!(rng.queue_max_sizes(), [256]);
    assert_eq!(
        rng.features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    );
    assert_eq!(rng.config_size(), 0);
    assert!(!rng.is_activated());
}

#[test]
fn fills_writable_buffers_with_random_bytes() {
    let mut h = Harness::new(RateLimiterConfig::default());
    let a = h.q.add_chain(&[(DATA, 4096, W)]);
    // One request spread over three buffers.
    let b = h.q.add_chain(&[
        (DATA + 0x1_0000, 100, W),
        (DATA + 0x2_0000, 0, W),
        (DATA + 0x3_0000, 3996, W),
    ]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(a, 4096), (b, 4096)]);
    let first = h.bytes(DATA, 4096);
    let second = [
        h.bytes(DATA + 0x1_0000, 100),
        h.bytes(DATA + 0x3_0000, 3996),
    ]
    .concat();
    // 4096 random bytes hold about 16 zeroes; 100 would be very unlikely.
    assert!(zeroes(&first) < 100, "{}", zeroes(&first));
    assert!(zeroes(&second) < 100, "{}", zeroes(&second));
    assert_ne!(first, second);
    // Nothing written past the buffers.
    assert_eq!(h.bytes(DATA + 4096, 64), [0; 64]);
    assert_eq!(h.bytes(DATA + 0x1_0000 + 100, 64), [0; 64]);
    // One interrupt for the batch.
    assert_eq!(h.interrupt.vring_count(), 1);
    let m = h.rng.metrics();
    assert_eq!(m.entropy_bytes.count(), 8192);
    assert_eq!(m.entropy_event_count.count(), 2);
    assert_eq!(m.entropy_event_fails.count(), 0);
}

#[test]
fn device_readable_chains_come_back_empty_and_counted() {
    let mut h = Harness::new(RateLimiterConfig::default());
    h.fill(DATA, 8192, 0xaa);
    let a = h.q.add_chain(&[(DATA, 64, R)]);
    // A writable buffer followed by a readable one: nothing is written.
    let b =
        h.q.add_chain(&[(DATA + 4096, 64, W), (DATA + 4096 + 64, 64, R)]);
    let c = h.q.add_chain(&[(DATA + 0x2_0000, 32, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(a, 0), (b, 0), (c, 32)]);
    assert_eq!(h.bytes(DATA, 8192), vec![0xaa; 8192]);
    let m = h.rng.metrics();
    assert_eq!(m.entropy_event_fails.count(), 2);
    assert_eq!(m.entropy_event_count.count(), 3);
    assert_eq!(m.entropy_bytes.count(), 32);
}

#[test]
fn buffers_outside_guest_memory_come_back_empty() {
    let mut h = Harness::new(RateLimiterConfig::default());
    h.fill(DATA, 64, 0x55);
    let a = h.q.add_chain(&[(DATA, 64, W), (MEM_SIZE - 16, 32, W)]);
    let b = h.q.add_chain(&[(u64::MAX - 8, 64, W)]);
    let c = h.q.add_chain(&[(MEM_SIZE + 0x1000, 1, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(a, 0), (b, 0), (c, 0)]);
    assert_eq!(h.bytes(DATA, 64), [0x55; 64]);
    assert_eq!(h.rng.metrics().entropy_event_fails.count(), 3);
    assert_eq!(h.rng.metrics().entropy_bytes.count(), 0);
}

#[test]
fn parse_names_the_offending_descriptor() {
    let mut h = Harness::inactive(RateLimiterConfig::default());
    h.q.add_chain(&[(DATA, 8, W), (DATA + 8, 8, R)]);
    h.q.add_chain(&[(DATA, 8, W), (MEM_SIZE, 8, W)]);
    let mut q: Queue = h.q.vq.create_queue().unwrap();
    let mut iter = virtio_queue::QueueOwnedT::iter(&mut q, h.mem).unwrap();
    assert_eq!(
        Request::parse(iter.next().unwrap(), h.mem),
        Err(ChainError::ReadOnly {
            position: 1,
            addr: DATA + 8,
            len: 8
        })
    );
    assert_eq!(
        Request::parse(iter.next().unwrap(), h.mem),
        Err(ChainError::OutsideMemory {
            position: 1,
            addr: MEM_SIZE,
            len: 8
        })
    );
}

#[test]
fn requests_are_capped_at_64_kib() {
    let mut h = Harness::new(RateLimiterConfig::default());
    // 32 buffers of 4 KiB: 128 KiB asked for.
    let descs: Vec<(u64, u32, u16)> = (0..32).map(|i| (DATA + 4096 * i, 4096, W)).collect();
    let head = h.q.add_chain(&descs);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(head, MAX_REQUEST_BYTES)]);
    let served = h.bytes(DATA, MAX_REQUEST_BYTES as usize);
    assert!(zeroes(&served) < 1024, "{}", zeroes(&served));
    // The second half is untouched.
    assert_eq!(
        h.bytes(DATA + u64::from(MAX_REQUEST_BYTES), 65536),
        vec![0; 65536]
    );
    assert_eq!(
        h.rng.metrics().entropy_bytes.count(),
        u64::from(MAX_REQUEST_BYTES)
    );
}

#[test]
fn empty_buffers_are_served_with_nothing() {
    let mut h = Harness::new(RateLimiterConfig::default());
    let head = h.q.add_chain(&[(DATA, 0, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(head, 0)]);
    assert_eq!(h.rng.metrics().entropy_event_fails.count(), 0);
}

#[test]
fn indirect_tables_are_followed() {
    let mut h = Harness::new(RateLimiterConfig::default());
    let table = [
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            16,
            W | VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(DATA + 0x100, 16, W, 0)),
    ];
    for (i, d) in table.iter().enumerate() {
        h.mem
            .write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let head = h.q.add_chain(&[(TABLE, 32, VRING_DESC_F_INDIRECT as u16)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(head, 32)]);
}

#[test]
fn no_interrupt_when_the_driver_suppresses_them() {
    let mut h = Harness::new(RateLimiterConfig::default());
    h.mem
        .write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, h.q.vq.avail_addr())
        .unwrap();
    h.q.add_chain(&[(DATA, 16, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used().len(), 1);
    assert_eq!(h.interrupt.vring_count(), 0);
}

/// Waits for the rate limiter's timer, hands the event to the device;
/// returns the used entries.
fn after_rate_limiter_timer(h: &mut Harness) -> Vec<(u16, u32)> {
    let mut pfd = libc::pollfd {
        fd: h.rng.rate_limiter_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(ready, 1, "the timer never fired");
    h.rng.handle_rate_limiter_event().unwrap();
    h.q.take_used()
}

#[test]
fn bandwidth_limit_holds_requests_until_the_timer() {
    // 4 KiB per 100 ms.
    let mut h = Harness::new(RateLimiterConfig {
        bandwidth: bucket(4096, 100),
        ops: None,
    });
    let start = Instant::now();
    let heads: Vec<u16> = (0..4)
        .map(|i| h.q.add_chain(&[(DATA + 4096 * i, 4096, W)]))
        .collect();
    h.rng.process_queue().unwrap();
    let mut used = h.q.take_used();
    assert_eq!(used, [(heads[0], 4096)], "the bucket holds one request");
    assert!(h.rng.rate_limiter().is_blocked());
    let m = h.rng.metrics().clone();
    assert_eq!(m.entropy_rate_limiter_throttled.count(), 1);
    // A kick while blocked serves nothing.
    h.rng.handle_queue_event().unwrap();
    assert!(h.q.take_used().is_empty());
    while used.len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(5));
        used.extend(after_rate_limiter_timer(&mut h));
    }
    // Three more buckets' worth of bytes take 300 ms of refill.
    assert!(
        start.elapsed() >= Duration::from_millis(290),
        "{:?}",
        start.elapsed()
    );
    // Nothing dropped, nothing reordered.
    let expected: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 4096)).collect();
    assert_eq!(used, expected);
    assert_eq!(m.entropy_bytes.count(), 4 * 4096);
    assert!(m.rate_limiter_event_count.count() >= 3);
    // Every request was counted once, plus once per refusal.
    assert_eq!(
        m.entropy_event_count.count(),
        4 + m.entropy_rate_limiter_throttled.count()
    );
}

#[test]
fn ops_limit_counts_every_request() {
    // Two requests per 100 ms, bytes unlimited; empty and invalid requests
    // are refused ones too.
    let mut h = Harness::new(RateLimiterConfig {
        bandwidth: None,
        ops: bucket(2, 100),
    });
    let start = Instant::now();
    h.q.add_chain(&[(DATA, 0, W)]);
    h.q.add_chain(&[(DATA, 8, W)]);
    h.q.add_chain(&[(DATA + 8, 8, W)]);
    h.rng.process_queue().unwrap();
    let mut used = h.q.take_used();
    assert_eq!(used.len(), 2);
    while used.len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(5));
        used.extend(after_rate_limiter_timer(&mut h));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(45),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 8, 8]);
}

#[test]
fn activation_is_guarded() {
    let mut h = Harness::new(RateLimiterConfig::default());
    let err = h
        .rng
        .activate(h.mem.clone(), Vec::new(), h.interrupt.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::AlreadyActivated), "{err:?}");
    assert!(h.rng.reset());
    assert!(!h.rng.is_activated());
    assert_eq!(h.rng.save().acked_features, 0);
    let err = h
        .rng
        .activate(h.mem.clone(), Vec::new(), h.interrupt.clone())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                actual: 0
            }
        ),
        "{err:?}"
    );
    assert_eq!(h.rng.metrics().activate_fails.count(), 2);
    // After a reset the device serves a new queue.
    h.q = DriverQueue::new(h.mem, 256);
    h.activate(1 << VIRTIO_F_VERSION_1);
    let head = h.q.add_chain(&[(DATA, 8, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used(), [(head, 8)]);
}

#[test]
fn queue_is_left_alone_before_activation() {
    let mut h = Harness::inactive(RateLimiterConfig::default());
    h.q.add_chain(&[(DATA, 8, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.vq.used().idx().load(), 0);
}

#[test]
fn published_count_larger_than_the_queue_is_an_error() {
    let mut h = Harness::new(RateLimiterConfig::default());
    h.q.add_chain(&[(DATA, 8, W)]);
    h.q.vq.avail().idx().store(1000);
    assert!(h.rng.process_queue().is_err());
    assert_eq!(h.q.vq.used().idx().load(), 0);
    assert_eq!(h.rng.metrics().entropy_event_fails.count(), 1);
}

#[test]
fn state_round_trip() {
    let h = Harness::new(RateLimiterConfig::default());
    let state = Persist::save(&h.rng);
    assert_eq!(
        state.acked_features,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    );
    let text = serde_json::to_string(&state).unwrap();
    let back: EntropyState = serde_json::from_str(&text).unwrap();
    let mut fresh = Entropy::new(&EntropyConfig::default()).unwrap();
    Persist::restore(&mut fresh, &back).unwrap();
    assert_eq!(Persist::save(&fresh), state);
    // A fresh, never-negotiated state restores too.
    let mut other = Entropy::new(&EntropyConfig::default()).unwrap();
    other.restore(&EntropyState { acked_features: 0 }).unwrap();
}

#[test]
fn state_refusals() {
    let mut h = Harness::new(RateLimiterConfig::default());
    let state = h.rng.save();
    // Activated: refused.
    assert!(matches!(
        h.rng.restore(&state),
        Err(EntropyStateError::InUse)
    ));
    let mut fresh = Entropy::new(&EntropyConfig::default()).unwrap();
    for acked in [
        // A feature never offered.
        (1 << VIRTIO_F_VERSION_1) | 1,
        // Without VIRTIO_F_VERSION_1.
        1 << VIRTIO_RING_F_EVENT_IDX,
    ] {
        let err = fresh
            .restore(&EntropyState {
                acked_features: acked,
            })
            .unwrap_err();
        assert!(
            matches!(err, EntropyStateError::Features { acked: a, .. } if a == acked),
            "{err:?}"
        );
        assert!(err.to_string().contains(&format!("{acked:#x}")), "{err}");
        // Nothing changed.
        assert_eq!(fresh.save().acked_features, 0);
    }
}

#[test]
fn random_chains_never_panic() {
    // A small xorshift generator: arbitrary descriptor tables, addresses
    // inside, at the edge of and outside guest memory, loops included.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..200 {
        let mut h = Harness::new(RateLimiterConfig::default());
        for i in 0..16u16 {
            let r = next();
            let addr = match r % 4 {
                0 => DATA + (r >> 8) % 0x10_0000,
                1 => MEM_SIZE - (r >> 8) % 64,
                2 => TABLE,
                _ => r >> 3,
            };
            let len = (r >> 32) as u32 % 0x2_0000;
            let flags = (r >> 16) as u16 & 0x7;
            let next_idx = (r >> 48) as u16 % 20;
            h.q.vq
                .desc_table()
                .store(
                    i,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next_idx)),
                )
                .unwrap();
        }
        for i in 0..8u16 {
            h.q.vq
                .avail()
                .ring()
                .ref_at(usize::from(i))
                .unwrap()
                .store(u16::to_le((next() % 20) as u16));
        }
        h.q.vq.avail().idx().store(8);
        let _ = h.rng.process_queue();
        let used = h.q.take_used();
        assert!(used.len() <= 8);
        assert!(used.iter().all(|u| u.1 <= MAX_REQUEST_BYTES));
    }
}

#[test]
fn runs_from_an_event_loop_through_activation_limiter_and_reset() {
    use std::sync::Mutex;

    use ember_virtio_mmio::test_utils::{initialize, write_reg, QueueLayout};
    use ember_virtio_mmio::{MmioTransport, NOTIFY_REG_OFFSET};
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use vm_memory::Address;

    // 16 bytes per 50 ms: the second request waits for the limiter's timer,
    // which the event loop watches.
    let rng = Arc::new(Mutex::new(
        Entropy::new(&EntropyConfig {
            rate_limiter: RateLimiterConfig {
                bandwidth: bucket(16, 50),
                ops: None,
            },
        })
        .unwrap(),
    ));
    let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    // Added before the driver starts the device, as the VMM does.
    events.add_subscriber(rng.clone());
    let mem = new_memory();
    let device: Arc<Mutex<dyn VirtioDevice>> = rng.clone();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut transport = MmioTransport::new(mem.clone(), device, irq.try_clone().unwrap()).unwrap();
    let vq = MockSplitQueue::new(mem, 256);
    let features = rng.lock().unwrap().features();
    let layout = QueueLayout {
        size: 256,
        desc: vq.desc_table_addr().raw_value(),
        driver: vq.avail_addr().raw_value(),
        device: vq.used_addr().raw_value(),
    };
    assert_eq!(initialize(&mut transport, features, &[layout]), 0xf);

    let chains = [
        RawDescriptor::from(SplitDescriptor::new(DATA, 16, W, 0)),
        RawDescriptor::from(SplitDescriptor::new(DATA + 16, 16, W, 0)),
    ];
    vq.add_desc_chains(&chains, 0).unwrap();
    // A kick before the event loop has seen the activation is kept.
    write_reg(&mut transport, NOTIFY_REG_OFFSET, 0);
    let start = Instant::now();
    while vq.used().idx().load() < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "never served");
        events.run_with_timeout(100).unwrap();
    }
    assert!(start.elapsed() >= Duration::from_millis(45));
    assert_eq!(transport.interrupt_status() & 1, 1);
    assert!(irq.read().is_ok());
    let m = rng.lock().unwrap().metrics().clone();
    assert_eq!(m.entropy_bytes.count(), 32);
    assert_eq!(m.entropy_rate_limiter_throttled.count(), 1);
    assert!(m.rate_limiter_event_count.count() >= 1);

    // After a reset the event loop stops watching the queue: a kick on the
    // old EventFd is not processed.
    let notify = transport.queue_notify_events()[0].try_clone().unwrap();
    write_reg(&mut transport, 0x70, 0);
    assert!(!rng.lock().unwrap().is_activated());
    events.run_with_timeout(100).unwrap();
    vq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(DATA, 16, W, 0))],
        2,
    )
    .unwrap();
    notify.write(1).unwrap();
    events.run_with_timeout(50).unwrap();
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(m.entropy_event_count.count(), 3);
}

#[test]
fn event_idx_suppresses_interrupts_and_publishes_avail_event() {
    let mut h = Harness::inactive(RateLimiterConfig::default());
    let features = h.rng.features();
    assert_ne!(features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    // The transport sets the queue's event index mode from the features.
    h.rng.ack_features(features);
    let mut queue: Queue = h.q.vq.create_queue().unwrap();
    virtio_queue::QueueT::set_event_idx(&mut queue, true);
    h.rng
        .activate(
            h.mem.clone(),
            vec![ActiveQueue {
                index: 0,
                queue,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            }],
            h.interrupt.clone(),
        )
        .unwrap();
    // used_event (after the available ring's 256 entries): interrupt only
    // once the used index passes 2.
    let used_event = GuestAddress(h.q.vq.avail_addr().0 + 4 + 2 * 256);
    h.mem.write_obj(2u16.to_le(), used_event).unwrap();
    h.q.add_chain(&[(DATA, 8, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used().len(), 1);
    assert_eq!(h.interrupt.vring_count(), 0);
    // avail_event (after the used ring's 256 entries) asks for the next
    // kick at the next entry.
    let avail_event = GuestAddress(h.q.vq.used_addr().0 + 4 + 8 * 256);
    assert_eq!(u16::from_le(h.mem.read_obj(avail_event).unwrap()), 1);
    h.q.add_chain(&[(DATA, 8, W)]);
    h.q.add_chain(&[(DATA, 8, W)]);
    h.rng.process_queue().unwrap();
    assert_eq!(h.q.take_used().len(), 2);
    assert_eq!(h.interrupt.vring_count(), 1);
}

/// Bytes of `buf` equal to zero.
fn zeros(buf: &[u8]) -> usize {
    buf.iter().filter(|&&b| b == 0).count()
}

#[test]
fn random_bytes_small_and_large_are_random_and_never_repeat() {
    use crate::{random_bytes, DIRECT_MAX_BYTES, MAX_REQUEST_BYTES};
    for len in [
        1,
        32,
        DIRECT_MAX_BYTES,
        DIRECT_MAX_BYTES + 1,
        4096,
        MAX_REQUEST_BYTES as usize,
    ] {
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        if len >= 32 {
            // Each large request has its own key: no two share a keystream.
            assert_ne!(a, b, "{len} bytes");
            // About len/256 zero bytes; an unfilled buffer is all zeros.
            assert!(zeros(&a) < len / 64 + 8, "{len} bytes: {} zeros", zeros(&a));
        }
    }
    // The second half of a large request is not the first half again.
    let mut big = vec![0u8; 8192];
    random_bytes(&mut big).unwrap();
    assert_ne!(big[..4096], big[4096..]);
}
