// SPDX-License-Identifier: Apache-2.0

//! The guest-facing HTTP/1.x side of the metadata service: one request in,
//! one response out, as Firecracker's MMDS answers.
//!
//! Requests are headers only (the service takes no bodies) and end at the
//! first empty line; [`request_end`] finds it. [`respond`] parses the
//! request with `httparse` and answers:
//! - `GET`: the value at the path (a JSON pointer), as JSON when the request
//!   says `Accept: application/json`, else as IMDS text; under V2 only with
//!   a live token in `X-metadata-token` (or `X-aws-ec2-metadata-token`),
//!   else `401`. V1 takes a token too, and only counts a missing or bad one.
//! - `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (or
//!   `X-aws-ec2-metadata-token-ttl-seconds`): a new session token. A `PUT`
//!   with `X-Forwarded-For` is refused.
//! - anything else: `405` with `Allow: GET, PUT` (`PATCH`), `501` (other
//!   methods), `400` (malformed).

use std::sync::Mutex;
use std::time::Instant;

use crate::data_store::{Mmds, MmdsError, MmdsVersion, OutputFormat};
use crate::metrics::MmdsMetrics;
use crate::token::PATH_TO_TOKEN;

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];
/// Most header lines a request may have.
const MAX_HEADERS: usize = 32;

const TEXT: &str = "text/plain";
const JSON: &str = "application/json";

/// An HTTP response as Firecracker's micro_http writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: &'static str,
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
    /// Whether to add `Allow: GET, PUT`.
    pub allow: bool,
    /// One extra header (the token lifetime echoed back).
    pub extra_header: Option<(String, String)>,
}

impl Response {
    fn new(version: &'static str, status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            version,
            status,
            content_type,
            body,
            allow: false,
            extra_header: None,
        }
    }

    fn text(version: &'static str, status: u16, body: impl Into<String>) -> Self {
        Response::new(version, status, TEXT, body.into())
    }

    /// The response's bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n",
            self.version, self.status
        );
        if self.allow {
            out.push_str("Allow: GET, PUT\r\n");
        }
        if let Some((name, value)) = &self.extra_header {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
            self.content_type,
            self.body.len()
        ));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

/// Where the first request in `buf` ends (just past its empty line), if
/// it is complete.
pub fn request_end(buf: &[u8]) -> Option<usize> {
    for i in 0..buf.len().saturating_sub(1) {
        if buf[i] != b'\n' {
            continue;
        }
        if buf[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if buf.get(i + 1..i + 3) == Some(b"\r\n") {
            return Some(i + 3);
        }
    }
    None
}

/// The path part of a request target, as micro_http's `get_abs_path`:
/// `http://host/path` gives `/path`; a target not starting with `/` gives "".
fn abs_path(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix("http://") {
        return rest.find('/').map_or("", |i| &rest[i..]);
    }
    if target.starts_with('/') {
        target
    } else {
        ""
    }
}

/// Collapses every `//` so the path is a strict JSON pointer.
fn sanitize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

struct Parsed<'a> {
    method: &'a str,
    target: &'a str,
    version: &'static str,
    headers: Vec<(&'a str, &'a str)>,
}

impl Parsed<'_> {
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            .copied()
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, Response> {
    const V11: &str = "HTTP/1.1";
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::Version) => {
            return Err(Response::text(
                V11,
                501,
                "Invalid HTTP Version: Unsupported HTTP version.",
            ))
        }
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(Response::text(V11, 400, "Invalid request."))
        }
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Response::text(V11, 400, "Invalid request."));
    };
    let version = if minor == 0 { "HTTP/1.0" } else { V11 };
    if !matches!(method, "GET" | "PUT" | "PATCH") {
        return Err(Response::text(
            version,
            501,
            "Invalid HTTP Method: Unsupported HTTP method.",
        ));
    }
    let mut list = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Err(Response::text(
                version,
                400,
                format!(
                    "Invalid header. Reason: Header contains invalid characters. Key: {}",
                    h.name
                ),
            ));
        };
        list.push((h.name, value.trim()));
    }
    Ok(Parsed {
        method,
        target,
        version,
        headers: list,
    })
}

/// Answers one complete request (`bytes` up to its empty line), counting
/// token failures in `metrics`.
pub fn respond(mmds: &Mutex<Mmds>, metrics: &MmdsMetrics, bytes: &[u8], now: Instant) -> Response {
    let req = match parse(bytes) {
        Ok(req) => req,
        Err(response) => return response,
    };
    let path = abs_path(req.target);
    if path.is_empty() {
        return Response::text(req.version, 400, "Invalid URI.");
    }
    let mut mmds = mmds.lock().unwrap_or_else(|e| e.into_inner());
    match req.method {
        "GET" => get(&mmds, metrics, &req, path, now),
        "PUT" => put(&mut mmds, &req, path, now),
        _ => {
            let mut r = Response::text(req.version, 405, "Not allowed HTTP method.");
            r.allow = true;
            r
        }
    }
}

fn get(mmds: &Mmds, metrics: &MmdsMetrics, req: &Parsed, path: &str, now: Instant) -> Response {
    let token = req.header(&TOKEN_HEADERS).map(|(_, v)| v);
    match (mmds.version(), token) {
        (MmdsVersion::V1, None) => metrics.rx_no_token.inc(),
        (MmdsVersion::V1, Some(t)) => {
            if !mmds.is_valid_token(t, now) {
                metrics.rx_invalid_token.inc();
            }
        }
        (MmdsVersion::V2, None) => {
            metrics.rx_no_token.inc();
            return Response::text(
                req.version,
                401,
                "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token.",
            );
        }
        (MmdsVersion::V2, Some(t)) => {
            if !mmds.is_valid_token(t, now) {
                metrics.rx_invalid_token.inc();
                return Response::text(req.version, 401, "MMDS token not valid.");
            }
        }
    }
    let json = req.header(&["accept"]).is_some_and(|(_, v)| v == JSON);
    let (format, content_type) = if json {
        (OutputFormat::Json, JSON)
    } else {
        (OutputFormat::Imds, TEXT)
    };
    match mmds.get_value(&sanitize(path), format) {
        Ok(body) => Response::new(req.version, 200, content_type, body),
        Err(MmdsError::NotFound) => {
            Response::text(req.version, 404, format!("Resource not found: {path}."))
        }
        Err(MmdsError::UnsupportedValueType) => Response::text(
            req.version,
            501,
            MmdsError::UnsupportedValueType.to_string(),
        ),
        Err(e) => Response::text(req.version, 413, e.to_string()),
    }
}

fn put(mmds: &mut Mmds, req: &Parsed, path: &str, now: Instant) -> Response {
    if let Some((name, _)) = req.header(&[X_FORWARDED_FOR]) {
        return Response::text(
            req.version,
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {name}"),
        );
    }
    if sanitize(path) != PATH_TO_TOKEN {
        return Response::text(req.version, 404, format!("Resource not found: {path}."));
    }
    let Some((name, value)) = req.header(&TTL_HEADERS) else {
        return Response::text(
            req.version,
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::text(
            req.version,
            400,
            format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
        );
    };
    match mmds.generate_token(ttl, now) {
        Ok(token) => {
            let mut r = Response::text(req.version, 200, token);
            r.extra_header = Some((name.to_string(), ttl.to_string()));
            r
        }
        Err(MmdsError::TokenAuthority(e)) => Response::text(req.version, 400, e.to_string()),
        Err(e) => Response::text(req.version, 400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn store(version: MmdsVersion) -> Mutex<Mmds> {
        let mut m = Mmds::default();
        m.set_version(version);
        m.put_data(json!({"latest": {"meta-data": {"id": "i-123", "n": 7}}, "age": 43}))
            .unwrap();
        Mutex::new(m)
    }

    fn ask(m: &Mutex<Mmds>, req: &str) -> Response {
        respond(m, &MmdsMetrics::default(), req.as_bytes(), Instant::now())
    }

    #[test]
    fn v1_json_and_text() {
        let m = store(MmdsVersion::V1);
        let r = ask(
            &m,
            "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!((r.status, r.content_type), (200, JSON));
        assert_eq!(r.body, r#"{"id":"i-123","n":7}"#);
        let r = ask(&m, "GET /latest/meta-data/ HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.content_type), (200, TEXT));
        assert_eq!(r.body, "id\nn");
        let r = ask(
            &m,
            "GET http://169.254.169.254//latest//meta-data/id HTTP/1.0\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            (r.version, r.status, r.body.as_str()),
            ("HTTP/1.0", 200, "i-123")
        );
        let r = ask(&m, "GET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.body, "age\nlatest/");
        let r = ask(&m, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 501);
        let r = ask(&m, "GET /nothing HTTP/1.1\r\n\r\n");
        assert_eq!(
            (r.status, r.body.as_str()),
            (404, "Resource not found: /nothing.")
        );
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.1 404 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: text/plain\r\nContent-Length: 29\r\n\r\nResource not found: /nothing."
        );
    }

    #[test]
    fn v1_counts_missing_and_bad_tokens() {
        let m = store(MmdsVersion::V1);
        let metrics = MmdsMetrics::default();
        let now = Instant::now();
        let r = respond(
            &m,
            &metrics,
            b"GET /age HTTP/1.1\r\nAccept: application/json\r\n\r\n",
            now,
        );
        assert_eq!(r.body, "43");
        let r = respond(
            &m,
            &metrics,
            b"GET /age HTTP/1.1\r\nX-metadata-token: bad\r\nAccept: application/json\r\n\r\n",
            now,
        );
        assert_eq!(r.status, 200);
        assert_eq!(metrics.rx_no_token.count(), 1);
        assert_eq!(metrics.rx_invalid_token.count(), 1);
    }

    #[test]
    fn v2_needs_a_live_token() {
        let m = store(MmdsVersion::V2);
        let metrics = MmdsMetrics::default();
        let now = Instant::now();
        let r = respond(&m, &metrics, b"GET /age HTTP/1.1\r\n\r\n", now);
        assert_eq!(r.status, 401);
        assert!(r.body.starts_with("No MMDS token provided."));
        let r = respond(
            &m,
            &metrics,
            b"GET /age HTTP/1.1\r\nX-metadata-token: nope\r\n\r\n",
            now,
        );
        assert_eq!((r.status, r.body.as_str()), (401, "MMDS token not valid."));

        let r = respond(
            &m,
            &metrics,
            b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
            now,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.extra_header,
            Some(("X-metadata-token-ttl-seconds".to_string(), "60".to_string()))
        );
        let token = r.body;
        let get = format!(
            "GET /latest/meta-data/id HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
        );
        let r = respond(&m, &metrics, get.as_bytes(), now);
        assert_eq!((r.status, r.body.as_str()), (200, "i-123"));
        let r = respond(&m, &metrics, get.as_bytes(), now + Duration::from_secs(60));
        assert_eq!(r.status, 401);
        assert_eq!(metrics.rx_no_token.count(), 1);
        assert_eq!(metrics.rx_invalid_token.count(), 2);
    }

    #[test]
    fn token_requests_are_checked() {
        let m = store(MmdsVersion::V2);
        let r = ask(&m, "PUT /latest/api/token HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 400);
        assert!(r.body.starts_with("Token time to live value not found."));
        let r = ask(
            &m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
        );
        assert_eq!(r.status, 400);
        assert!(r
            .body
            .starts_with("Invalid time to live value provided for token: 0."));
        let r = ask(
            &m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n",
        );
        assert_eq!(
            r.body,
            "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:x"
        );
        let r = ask(&m, "PUT /latest/api/token HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n");
        assert_eq!(r.status, 400);
        let r = ask(
            &m,
            "PUT /age HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n",
        );
        assert_eq!(r.status, 404);
    }

    #[test]
    fn bad_requests_get_firecrackers_statuses() {
        let m = store(MmdsVersion::V1);
        let r = ask(&m, "PATCH /age HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.allow), (405, true));
        assert!(String::from_utf8(r.to_bytes())
            .unwrap()
            .contains("Allow: GET, PUT\r\n"));
        assert_eq!(ask(&m, "DELETE /age HTTP/1.1\r\n\r\n").status, 501);
        assert_eq!(ask(&m, "GET /age HTTP/2.0\r\n\r\n").status, 501);
        assert_eq!(ask(&m, "GET age HTTP/1.1\r\n\r\n").status, 400);
        assert_eq!(ask(&m, "garbage\r\n\r\n").status, 400);
        assert_eq!(ask(&m, "\r\n\r\n").status, 400);
    }

    #[test]
    fn request_end_finds_the_empty_line() {
        assert_eq!(request_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(request_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(request_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(request_end(b""), None);
        assert_eq!(request_end(b"\n"), None);
    }
}
