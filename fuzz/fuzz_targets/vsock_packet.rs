// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the vsock packet parsers the device runs on every descriptor chain
//! the driver hands it: `ember_vsock::TxPacket::parse` (TX queue) and
//! `ember_vsock::RxBuffer::parse` (RX queue), plus `VsockHeader::parse`.
//!
//! Input layout:
//! - byte 0: number of descriptors in the table, minus one (mod 16);
//! - byte 1: the chain's head index;
//! - then 16 bytes per descriptor, as in the split ring (le64 addr, le32
//!   len, le16 flags, le16 next; flags may chain, be device-writable or
//!   point to an indirect table);
//! - the rest is guest memory contents, copied at `DATA_ADDR`.
//!
//! Guest memory has a hole (`[0x10000, 0x20000)`) so that descriptors can
//! run off a region. Checked: a parsed TX packet's payload is exactly `len`
//! (at most 64 KiB) bytes of guest memory; an RX buffer's capacity is at most
//! 64 KiB and writing a whole packet into it stays within it; a header
//! survives an encode/decode round trip.

#![no_main]

use std::sync::OnceLock;

use ember_vsock::packet::{HEADER_SIZE, MAX_PKT_BUF_SIZE};
use ember_vsock::{RxBuffer, TxPacket, VsockHeader};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const DESC_ADDR: u64 = 0;
const AVAIL_ADDR: u64 = 0x100;
const USED_ADDR: u64 = 0x200;
const DATA_ADDR: u64 = 0x1000;
const REGION_SIZE: usize = 0x1_0000;
const SECOND_REGION: u64 = 0x2_0000;

fn guest_memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION_SIZE),
            (GuestAddress(SECOND_REGION), REGION_SIZE),
        ])
        .expect("guest memory")
    })
}

/// A queue whose available ring offers `head`, over the descriptor table at
/// `DESC_ADDR`.
fn queue(mem: &GuestMemoryMmap, head: u16) -> Queue {
    mem.write_obj(0u16, GuestAddress(AVAIL_ADDR)).unwrap();
    mem.write_obj(1u16.to_le(), GuestAddress(AVAIL_ADDR + 2))
        .unwrap();
    mem.write_obj(head.to_le(), GuestAddress(AVAIL_ADDR + 4))
        .unwrap();
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_ADDR as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_ADDR as u32), Some(0));
    q.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    if let Ok(hdr) = VsockHeader::parse(data) {
        assert_eq!(&hdr.to_bytes()[..], &data[..HEADER_SIZE]);
        assert_eq!(VsockHeader::from_bytes(&hdr.to_bytes()), hdr);
    }

    let mem = guest_memory();
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let Some((&head, rest)) = rest.split_first() else {
        return;
    };
    let count = usize::from(count % QUEUE_SIZE as u8) + 1;
    let table_len = (count * 16).min(rest.len());
    let (table, contents) = rest.split_at(table_len);

    // Fresh memory for every input: zero what the previous one wrote.
    let zeroes = vec![0u8; REGION_SIZE];
    mem.write_slice(&zeroes, GuestAddress(0)).unwrap();
    mem.write_slice(&zeroes, GuestAddress(SECOND_REGION))
        .unwrap();
    mem.write_slice(table, GuestAddress(DESC_ADDR)).unwrap();
    let room = REGION_SIZE - DATA_ADDR as usize;
    let contents = &contents[..contents.len().min(room)];
    mem.write_slice(contents, GuestAddress(DATA_ADDR)).unwrap();
    // The same bytes in the second region, for descriptors that go there.
    mem.write_slice(contents, GuestAddress(SECOND_REGION))
        .unwrap();

    let head = u16::from(head) % QUEUE_SIZE;

    let mut q = queue(mem, head);
    if let Some(chain) = q.iter(mem).ok().and_then(|mut it| it.next()) {
        if let Ok(pkt) = TxPacket::parse(mem, chain) {
            let len = pkt.header().len as usize;
            assert!(len <= MAX_PKT_BUF_SIZE);
            let total: usize = pkt.payload().iter().map(|s| s.len()).sum();
            assert_eq!(total, len);
            assert_eq!(pkt.payload_to_vec().len(), len);
        }
    }

    let mut q = queue(mem, head);
    if let Some(chain) = q.iter(mem).ok().and_then(|mut it| it.next()) {
        if let Ok(buf) = RxBuffer::parse(mem, chain) {
            let cap = buf.payload_capacity();
            assert!(cap <= MAX_PKT_BUF_SIZE);
            let total: usize = buf.payload(usize::MAX).iter().map(|s| s.len()).sum();
            assert_eq!(total, cap);
            let hdr = VsockHeader {
                len: cap as u32,
                ..VsockHeader::default()
            };
            buf.write_header(&hdr);
            assert_eq!(buf.write_payload(&vec![0xa5; cap + 1]), cap);
        }
    }
});
