// SPDX-License-Identifier: Apache-2.0

//! Fuzzes the API server's request path without a socket: the HTTP framing
//! (`ember_api::http::RequestDecoder`) and the router and body parser
//! (`ember_api::parse_request`), exactly as the API thread calls them.
//!
//! Input: the first byte picks how the rest is cut into reads (1 to 64
//! bytes at a time, as a slow or bursty client would send it); the rest is
//! the byte stream a client writes to the socket.
//!
//! Beyond "never panics":
//! - how the stream is cut into reads does not change what is decoded
//!   (apart from `100 Continue`, which depends on whether the body had
//!   arrived yet);
//! - every refusal has one of the statuses the API documents;
//! - an accepted request is accepted again from its own re-encoding, and
//!   the answer to it encodes as HTTP.

#![no_main]

use ember_api::http::{Decoded, RequestDecoder};
use ember_api::{error_to_http, parse_request, VmmAction, DEFAULT_MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

/// A small limit so oversized bodies are reachable by the fuzzer.
const MAX_PAYLOAD: usize = 512;

fn decode(stream: &[u8], chunk: usize) -> Vec<Decoded> {
    let mut decoder = RequestDecoder::new(MAX_PAYLOAD);
    let mut items = Vec::new();
    for piece in stream.chunks(chunk) {
        decoder.feed(piece);
        while let Some(item) = decoder.decode() {
            items.push(item);
        }
    }
    items
        .into_iter()
        .filter(|i| !matches!(i, Decoded::Continue))
        .collect()
}

/// The body that a parsed configuration action came from, re-encoded.
fn reencode(action: &VmmAction) -> Option<String> {
    let json = match action {
        VmmAction::PutBootSource(b) => serde_json::to_string(b),
        VmmAction::PutMachineConfig(m) => serde_json::to_string(m),
        VmmAction::PatchMachineConfig(u) => serde_json::to_string(u),
        VmmAction::PutDrive(d) => serde_json::to_string(d),
        VmmAction::PatchDrive(u) => serde_json::to_string(u),
        VmmAction::PutNetworkInterface(n) => serde_json::to_string(n),
        VmmAction::PutVsock(v) => serde_json::to_string(v),
        VmmAction::PutMetrics(m) => serde_json::to_string(m),
        _ => return None,
    };
    Some(json.expect("an accepted body serialises"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(cut % 64) + 1;
    let items = decode(stream, chunk);
    assert_eq!(
        items,
        decode(stream, stream.len().max(1)),
        "cut every {chunk} bytes"
    );

    for item in items {
        let req = match item {
            Decoded::Request(req) => req,
            Decoded::Reject { error, .. } => {
                assert!(matches!(error.status, 400 | 417 | 501), "{error:?}");
                assert!(!error_to_http(&error).encode(None, true).is_empty());
                continue;
            }
            Decoded::Continue => continue,
        };
        assert!(req.body.len() <= MAX_PAYLOAD);
        let action = match parse_request(&req.method, &req.path, &req.body, DEFAULT_MAX_PAYLOAD) {
            Ok(action) => action,
            Err(e) => {
                assert!(matches!(e.status, 400 | 404 | 405), "{e:?}");
                continue;
            }
        };
        if let Some(body) = reencode(&action) {
            let again = parse_request(&req.method, &req.path, body.as_bytes(), usize::MAX)
                .unwrap_or_else(|e| panic!("{action:?} re-encoded as {body} is refused: {e:?}"));
            assert_eq!(again, action, "round trip through {body}");
        }
    }
});
