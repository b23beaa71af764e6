//! HTTP/1.1 framing over a byte stream: [`RequestDecoder`] turns received
//! bytes into requests (the request head is parsed by `httparse`, the body
//! is framed by `Content-Length`), and [`HttpResponse`] encodes answers.
//!
//! No I/O here: the server feeds bytes in and writes bytes out, and the
//! decoder is fuzzed on its own.

use std::fmt::Write as _;

use super::action::{ApiError, VmmData, VmmResponse, EMBER_VERSION};
use super::request::payload_too_large;

/// Longest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_LEN: usize = 8 * 1024;

/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 32;

/// Bodies up to this size past the payload limit are read and thrown away
/// so the connection stays usable; larger ones close it.
const MAX_DISCARD: usize = 4 * 1024 * 1024;

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method token, e.g. `PUT`.
    pub method: String,
    /// Request target, e.g. `/drives/rootfs`.
    pub path: String,
    /// Body bytes (empty when there is none).
    pub body: Vec<u8>,
    /// Whether the client keeps the connection open after the answer.
    pub keep_alive: bool,
}

/// What the decoder found next in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete request.
    Request(HttpRequest),
    /// The client sent `Expect: 100-continue`: answer `100 Continue` now.
    Continue,
    /// A request that cannot be served. `close` is set when the stream can
    /// no longer be followed and the connection must be closed after the
    /// answer.
    Reject {
        /// The answer.
        error: ApiError,
        /// Close the connection after answering.
        close: bool,
    },
}

#[derive(Debug)]
enum State {
    /// Waiting for a request head.
    Head,
    /// Receiving a body of `len` bytes after a head.
    Body {
        method: String,
        path: String,
        len: usize,
        keep_alive: bool,
    },
    /// Throwing away `remaining` bytes of a body that was too large.
    Discard { remaining: usize },
    /// The stream can no longer be followed; everything is ignored.
    Broken,
}

/// Splits a byte stream into HTTP/1.x requests.
#[derive(Debug)]
pub struct RequestDecoder {
    buf: Vec<u8>,
    state: State,
    max_payload: usize,
}

struct Head {
    method: String,
    path: String,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
    len: usize,
}

fn bad(message: impl Into<String>) -> Decoded {
    Decoded::Reject {
        error: ApiError::bad_request(message),
        close: true,
    }
}

fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|b| *b == b',').any(|part| {
        std::str::from_utf8(part)
            .map(|s| s.trim().eq_ignore_ascii_case(token))
            .unwrap_or(false)
    })
}

impl RequestDecoder {
    /// A decoder for bodies of at most `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        RequestDecoder {
            buf: Vec::new(),
            state: State::Head,
            max_payload,
        }
    }

    /// Appends received bytes. Call [`decode`](Self::decode) until it returns
    /// `None` after each call.
    pub fn feed(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Broken => {}
            State::Discard { remaining } if self.buf.is_empty() => {
                // Do not even buffer what is thrown away.
                let n = bytes.len().min(*remaining);
                *remaining -= n;
                if *remaining == 0 {
                    self.state = State::Head;
                }
                if let Some(rest) = bytes.get(n..) {
                    self.buf.extend_from_slice(rest);
                }
            }
            _ => self.buf.extend_from_slice(bytes),
        }
    }

    /// Whether part of a request has arrived but not all of it.
    pub fn in_request(&self) -> bool {
        match self.state {
            State::Head => !self.buf.is_empty(),
            State::Body { .. } | State::Discard { .. } => true,
            State::Broken => false,
        }
    }

    /// Whether the stream could not be followed (the connection is to be
    /// closed).
    pub fn is_broken(&self) -> bool {
        matches!(self.state, State::Broken)
    }

    /// The next complete item in the buffered bytes, if any.
    pub fn decode(&mut self) -> Option<Decoded> {
        loop {
            match &mut self.state {
                State::Broken => return None,
                State::Discard { remaining } => {
                    let n = self.buf.len().min(*remaining);
                    self.buf.drain(..n);
                    *remaining -= n;
                    if *remaining > 0 {
                        return None;
                    }
                    self.state = State::Head;
                }
                State::Body { len, .. } => {
                    let len = *len;
                    if self.buf.len() < len {
                        return None;
                    }
                    let State::Body {
                        method,
                        path,
                        keep_alive,
                        ..
                    } = std::mem::replace(&mut self.state, State::Head)
                    else {
                        return None;
                    };
                    let body: Vec<u8> = self.buf.drain(..len).collect();
                    return Some(self.finish(method, path, body, keep_alive));
                }
                State::Head => {
                    let head = match self.parse_head() {
                        Ok(Some(head)) => head,
                        Ok(None) => return None,
                        Err(reject) => {
                            self.state = State::Broken;
                            self.buf.clear();
                            return Some(reject);
                        }
                    };
                    self.buf.drain(..head.len);
                    if head.content_length > self.max_payload {
                        let error = payload_too_large(head.content_length, self.max_payload);
                        // A client that waits for `100 Continue` will not
                        // send the body; one that sends it anyway has its
                        // bytes skipped so the connection stays in step.
                        if head.expect_continue || head.content_length > MAX_DISCARD {
                            self.state = State::Broken;
                            self.buf.clear();
                            return Some(Decoded::Reject { error, close: true });
                        }
                        self.state = State::Discard {
                            remaining: head.content_length,
                        };
                        return Some(Decoded::Reject {
                            error,
                            close: !head.keep_alive,
                        });
                    }
                    if head.content_length == 0 {
                        return Some(self.finish(
                            head.method,
                            head.path,
                            Vec::new(),
                            head.keep_alive,
                        ));
                    }
                    let waiting = self.buf.len() < head.content_length;
                    self.state = State::Body {
                        method: head.method,
                        path: head.path,
                        len: head.content_length,
                        keep_alive: head.keep_alive,
                    };
                    if head.expect_continue && waiting {
                        return Some(Decoded::Continue);
                    }
                }
            }
        }
    }

    fn finish(&mut self, method: String, path: String, body: Vec<u8>, keep_alive: bool) -> Decoded {
        if !keep_alive {
            // Nothing after a closing request is read.
            self.state = State::Broken;
            self.buf.clear();
        }
        Decoded::Request(HttpRequest {
            method,
            path,
            body,
            keep_alive,
        })
    }

    fn parse_head(&self) -> Result<Option<Head>, Decoded> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if self.buf.len() > MAX_HEAD_LEN {
                    return Err(bad(format!(
                        "Invalid request: the request head is longer than {MAX_HEAD_LEN} bytes."
                    )));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(bad(format!(
                    "Invalid request: more than {MAX_HEADERS} headers."
                )))
            }
            Err(e) => return Err(bad(format!("Invalid request: {e}."))),
        };
        if len > MAX_HEAD_LEN {
            return Err(bad(format!(
                "Invalid request: the request head is longer than {MAX_HEAD_LEN} bytes."
            )));
        }
        // `Complete` guarantees method, path and version.
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(bad("Invalid request."));
        };
        let mut content_length: Option<usize> = None;
        let mut connection_close = false;
        let mut connection_keep_alive = false;
        let mut expect_continue = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok());
                let Some(value) = value else {
                    return Err(bad(format!(
                        "Invalid header. Reason: Invalid value. Key:Content-Length; Value: {}",
                        String::from_utf8_lossy(h.value)
                    )));
                };
                if content_length.is_some_and(|c| c != value) {
                    return Err(bad("Invalid request: conflicting Content-Length headers."));
                }
                content_length = Some(value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Decoded::Reject {
                    error: ApiError::new(
                        501,
                        "Transfer-Encoding is not supported: send the body with a Content-Length.",
                    ),
                    close: true,
                });
            } else if h.name.eq_ignore_ascii_case("connection") {
                connection_close |= has_token(h.value, "close");
                connection_keep_alive |= has_token(h.value, "keep-alive");
            } else if h.name.eq_ignore_ascii_case("expect") {
                if has_token(h.value, "100-continue") {
                    expect_continue = true;
                } else {
                    return Err(Decoded::Reject {
                        error: ApiError::new(
                            417,
                            format!(
                                "Unsupported Expect header: {}",
                                String::from_utf8_lossy(h.value)
                            ),
                        ),
                        close: true,
                    });
                }
            }
        }
        // HTTP/1.1 keeps connections open unless told otherwise; 1.0 closes
        // them unless told otherwise (RFC 9112 §9.3).
        let keep_alive = if version == 1 {
            !connection_close
        } else {
            connection_keep_alive && !connection_close
        };
        Ok(Some(Head {
            method: method.to_string(),
            path: path.to_string(),
            content_length: content_length.unwrap_or(0),
            keep_alive,
            expect_continue,
            len,
        }))
    }
}

/// An answer ready to be encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
    /// The request used a deprecated field: a `Deprecation: true` header
    /// (RFC 9745) says so, as Firecracker's does.
    pub deprecated: bool,
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

impl HttpResponse {
    /// Encodes the response. `allow` fills the `Allow` header (for 405),
    /// `close` announces that the connection closes after it.
    pub fn encode(&self, allow: Option<&[&str]>, close: bool) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nServer: Ember API\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            if close { "close" } else { "keep-alive" }
        );
        if let Some(methods) = allow {
            let _ = write!(head, "Allow: {}\r\n", methods.join(", "));
        }
        if self.deprecated {
            head.push_str("Deprecation: true\r\n");
        }
        match &self.body {
            Some(body) => {
                let _ = write!(
                    head,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let mut out = head.into_bytes();
                out.extend_from_slice(body.as_bytes());
                out
            }
            // A 204 carries no Content-Length (RFC 9110 §8.6); other
            // bodiless answers say 0 so clients need not wait for a close.
            None if self.status == 204 => {
                head.push_str("\r\n");
                head.into_bytes()
            }
            None => {
                head.push_str("Content-Length: 0\r\n\r\n");
                head.into_bytes()
            }
        }
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn json<T: serde::Serialize>(value: &T) -> HttpResponse {
    match serde_json::to_string(value) {
        Ok(body) => HttpResponse {
            status: 200,
            body: Some(body),
            deprecated: false,
        },
        Err(e) => error_to_http(&ApiError::internal(format!(
            "cannot serialise the response: {e}"
        ))),
    }
}

/// `{"fault_message": ...}` with the error's status.
pub fn error_to_http(error: &ApiError) -> HttpResponse {
    HttpResponse {
        status: error.status,
        body: Some(serde_json::json!({ "fault_message": error.message }).to_string()),
        deprecated: false,
    }
}

/// The HTTP answer for the VMM's response: 204 for [`VmmData::Empty`], 200
/// with a JSON body for data, the error's status with
/// `{"fault_message": ...}` for an error.
pub fn response_to_http(response: &VmmResponse) -> HttpResponse {
    match response {
        Ok(VmmData::Empty) => HttpResponse {
            status: 204,
            body: None,
            deprecated: false,
        },
        Ok(VmmData::InstanceInfo(info)) => json(info),
        Ok(VmmData::Version(v)) => json(&serde_json::json!({
            "firecracker_version": v,
            "ember_version": EMBER_VERSION,
        })),
        Ok(VmmData::VmConfig(c)) => json(&c.to_api_json()),
        Ok(VmmData::MachineConfig(m)) => json(m),
        Ok(VmmData::MmdsValue(v)) => json(v),
        Ok(VmmData::Balloon(b)) => json(b),
        Ok(VmmData::BalloonStats(s)) => json(s),
        Ok(VmmData::HintingStatus(h)) => json(h),
        Err(e) => error_to_http(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{InstanceInfo, InstanceState};
    use ember_config::MachineConfig;

    fn decode_all(d: &mut RequestDecoder) -> Vec<Decoded> {
        std::iter::from_fn(|| d.decode()).collect()
    }

    fn request(d: Decoded) -> HttpRequest {
        match d {
            Decoded::Request(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pipelined_requests_split_in_order() {
        let mut d = RequestDecoder::new(1000);
        d.feed(b"GET / HTTP/1.1\r\n\r\nPUT /vsock HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /version HTTP/1.1\r\n\r\n");
        let items = decode_all(&mut d);
        assert_eq!(items.len(), 3);
        let r: Vec<HttpRequest> = items.into_iter().map(request).collect();
        assert_eq!((r[0].method.as_str(), r[0].path.as_str()), ("GET", "/"));
        assert_eq!(
            (r[1].method.as_str(), r[1].body.as_slice()),
            ("PUT", &b"{}"[..])
        );
        assert_eq!(r[2].path, "/version");
        assert!(r.iter().all(|r| r.keep_alive));
        assert!(!d.in_request());
    }

    #[test]
    fn byte_by_byte_arrival() {
        let mut d = RequestDecoder::new(1000);
        let msg = b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\": \"Paused\"}";
        for (i, b) in msg.iter().enumerate() {
            d.feed(&[*b]);
            let items = decode_all(&mut d);
            if i + 1 < msg.len() {
                assert!(items.is_empty(), "early item at {i}: {items:?}");
                assert!(d.in_request());
            } else {
                assert_eq!(request(items[0].clone()).body, b"{\"state\": \"Paused\"}");
            }
        }
    }

    #[test]
    fn oversized_body_is_rejected_and_skipped() {
        let mut d = RequestDecoder::new(10);
        d.feed(b"PUT /vsock HTTP/1.1\r\nContent-Length: 20\r\n\r\n");
        d.feed(&[b'x'; 15]);
        let items = decode_all(&mut d);
        let [Decoded::Reject { error, close }] = items.as_slice() else {
            panic!("{items:?}")
        };
        assert_eq!(error.status, 400);
        assert_eq!(
            error.message,
            "Request payload with size 20 is larger than the limit of 10 allowed by server."
        );
        assert!(!close);
        // The rest of the body is skipped, then the next request is read.
        d.feed(b"xxxxxGET / HTTP/1.1\r\n\r\n");
        let items = decode_all(&mut d);
        assert_eq!(request(items[0].clone()).path, "/");
    }

    #[test]
    fn oversized_body_with_expect_closes() {
        let mut d = RequestDecoder::new(10);
        d.feed(b"PUT /vsock HTTP/1.1\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n");
        let items = decode_all(&mut d);
        assert!(matches!(
            items.as_slice(),
            [Decoded::Reject { close: true, .. }]
        ));
        assert!(d.is_broken());
    }

    #[test]
    fn expect_continue_is_answered_before_the_body() {
        let mut d = RequestDecoder::new(100);
        d.feed(b"PUT /vsock HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n");
        assert_eq!(decode_all(&mut d), vec![Decoded::Continue]);
        d.feed(b"{}");
        assert_eq!(request(decode_all(&mut d).remove(0)).body, b"{}");
    }

    #[test]
    fn malformed_heads_close_the_connection() {
        for bad_input in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: alpha\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            let mut d = RequestDecoder::new(100);
            d.feed(bad_input);
            let items = decode_all(&mut d);
            assert!(
                matches!(items.as_slice(), [Decoded::Reject { close: true, .. }]),
                "{:?}: {items:?}",
                String::from_utf8_lossy(bad_input)
            );
            assert!(d.is_broken());
            d.feed(b"GET / HTTP/1.1\r\n\r\n");
            assert!(decode_all(&mut d).is_empty());
        }
        let mut d = RequestDecoder::new(100);
        d.feed(format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD_LEN)).as_bytes());
        assert!(matches!(
            decode_all(&mut d).as_slice(),
            [Decoded::Reject { close: true, .. }]
        ));
    }

    #[test]
    fn connection_header_and_http_1_0() {
        let mut d = RequestDecoder::new(100);
        d.feed(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        let items = decode_all(&mut d);
        assert_eq!(items.len(), 1, "nothing is read after a closing request");
        assert!(!request(items[0].clone()).keep_alive);
        let mut d = RequestDecoder::new(100);
        d.feed(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!request(decode_all(&mut d).remove(0)).keep_alive);
        let mut d = RequestDecoder::new(100);
        d.feed(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(request(decode_all(&mut d).remove(0)).keep_alive);
    }

    #[test]
    fn responses_encode_with_status_and_json() {
        let r = response_to_http(&Ok(VmmData::Empty));
        let text = String::from_utf8(r.encode(None, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
        assert!(!text.contains("Content-Length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"));

        let r = response_to_http(&Err(ApiError::new(405, "no")));
        let text = String::from_utf8(r.encode(Some(&["PUT", "PATCH"]), true)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("Allow: PUT, PATCH\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"fault_message\":\"no\"}"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 22\r\n"), "{text}");

        let r = response_to_http(&Ok(VmmData::Version("1.2.3".into())));
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["firecracker_version"], "1.2.3");
        assert_eq!(v["ember_version"], EMBER_VERSION);

        let r = response_to_http(&Ok(VmmData::InstanceInfo(InstanceInfo::new(
            "a",
            InstanceState::Running,
        ))));
        assert_eq!(r.status, 200);
        assert!(r.body.unwrap().contains("\"state\":\"Running\""));

        let r = response_to_http(&Ok(VmmData::MachineConfig(MachineConfig::default())));
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(v["vcpu_count"], 1);
        assert_eq!(v["mem_size_mib"], 128);
    }
}
