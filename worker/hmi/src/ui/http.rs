//! HTTP/1.1 for the ui worker, as pure functions over bytes: request heads parsed with
//! `httparse` under hard limits, the few request headers the ui acts on, query strings and
//! cookies, and responses carrying the security headers every answer needs.
//!
//! Owns no socket and makes no call, so every limit is unit-tested here. Never logs, and
//! never echoes request bytes back into a response: rejections carry fixed messages.

use airlock_protocol::Bulk;

/// Largest request head (request line and headers, with the blank line) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 64;
/// Largest request body (`Content-Length`) accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest session token taken from a cookie.
pub const MAX_TOKEN: usize = 512;

/// The `Content-Security-Policy` of every response: nothing but this origin, no inline
/// script or style, never framed.
pub const CSP: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// The request methods the ui distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    /// Any other syntactically valid method: answered 405 on known routes.
    Other,
}

impl Method {
    /// For logs: never the client's own spelling of an unknown method.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Other => "OTHER",
        }
    }
}

/// What the ui needs of a parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    /// The path, without the query; exactly as sent (never decoded, never normalised).
    pub path: String,
    pub query: Option<String>,
    /// Keep the connection open after the response (HTTP/1.1 without `Connection: close`,
    /// or HTTP/1.0 with `Connection: keep-alive`).
    pub keep_alive: bool,
    pub http10: bool,
    /// Length of the head in bytes, blank line included.
    pub head_len: usize,
    pub content_length: usize,
    /// `Content-Type` is `application/json` (parameters such as `charset` allowed).
    pub json: bool,
    /// The `airlock_session` cookie, if present and well-formed.
    pub session: Option<String>,
    pub expect_continue: bool,
    pub host: Option<String>,
    pub origin: Option<String>,
}

/// A request refused before routing; the connection is closed after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
}

/// The result of [`parse_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    Complete(Head),
    Reject(Reject),
}

const fn reject(status: u16, reason: &'static str) -> Parsed {
    Parsed::Reject(Reject { status, reason })
}

/// Where the head in `buf` ends (the index just past its blank line), searching from
/// `from` (bytes before it were searched already). Accepts CRLF and bare LF line ends, as
/// httparse does.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Parses a request head from the start of `buf` and applies the limits: a head over
/// [`MAX_HEAD`] or with more than [`MAX_HEADERS`] fields is 431, a body over [`MAX_BODY`] is
/// 413, a `Transfer-Encoding` (chunked bodies) is 411, anything malformed is 400.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return reject(431, "request head larger than 8 KiB"),
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return reject(431, "more than 64 header fields"),
        Err(_) if buf.len() > MAX_HEAD => return reject(431, "request head larger than 8 KiB"),
        Err(_) => return reject(400, "malformed request line or header"),
    };
    if n > MAX_HEAD {
        return reject(431, "request head larger than 8 KiB");
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return reject(400, "malformed request line");
    };
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        _ => Method::Other,
    };
    if !target.starts_with('/') {
        return reject(400, "the request target must be a path");
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut head = Head {
        method,
        path: path.to_string(),
        query,
        keep_alive: version == 1,
        http10: version == 0,
        head_len: n,
        content_length: 0,
        json: false,
        session: None,
        expect_continue: false,
        host: None,
        origin: None,
    };
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding = false;
    for f in req.headers.iter() {
        let name = f.name;
        let value = trim(f.value);
        if name.eq_ignore_ascii_case("content-length") {
            let Some(len) = parse_content_length(value) else {
                return reject(400, "malformed Content-Length");
            };
            if content_length.is_some_and(|l| l != len) {
                return reject(400, "conflicting Content-Length fields");
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("content-type") {
            head.json = is_json(value);
        } else if name.eq_ignore_ascii_case("cookie") {
            if head.session.is_none() {
                head.session = session_cookie(value);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && head.http10 {
                    head.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("host") {
            head.host = std::str::from_utf8(value).ok().map(str::to_string);
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = std::str::from_utf8(value).ok().map(str::to_string);
        }
    }
    if transfer_encoding {
        return reject(411, "chunked (Transfer-Encoding) request bodies are not supported: send Content-Length");
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY {
        return reject(413, "request body larger than 16 KiB");
    }
    head.content_length = len;
    Parsed::Complete(head)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// Decimal digits only (no sign, no list), at most 19 of them.
fn parse_content_length(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `application/json`, with or without parameters, in any letter case.
fn is_json(v: &[u8]) -> bool {
    let media = v.split(|&b| b == b';').next().unwrap_or_default();
    trim(media).eq_ignore_ascii_case(b"application/json")
}

/// The first `airlock_session` cookie of a `Cookie` field, if its value is a well-formed
/// token (cookie-octets only, at most [`MAX_TOKEN`] bytes).
pub fn session_cookie(v: &[u8]) -> Option<String> {
    for pair in v.split(|&b| b == b';') {
        let pair = trim(pair);
        let Some(eq) = pair.iter().position(|&b| b == b'=') else { continue };
        if &pair[..eq] != b"airlock_session" {
            continue;
        }
        let mut value = &pair[eq + 1..];
        if value.len() >= 2 && value.starts_with(b"\"") && value.ends_with(b"\"") {
            value = &value[1..value.len() - 1];
        }
        return (is_token(value)).then(|| String::from_utf8_lossy(value).into_owned());
    }
    None
}

/// A value that may stand in a cookie (RFC 6265 cookie-octets), non-empty and bounded.
pub fn is_token(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_TOKEN
        && v.iter().all(|&b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
}

/// Decodes one query-string component: `%XX` escapes and `+` for space. `None` for a
/// truncated or non-hex escape, or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex(*b.get(i + 1)?)?;
                let lo = hex(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Most parameters accepted in one query string.
pub const MAX_QUERY_PARAMS: usize = 16;

/// Splits and decodes a query string into `(name, value)` pairs. Refuses undecodable
/// components, more than [`MAX_QUERY_PARAMS`] pairs, and a name given twice.
pub fn query_pairs(q: &str) -> Result<Vec<(String, String)>, &'static str> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        if out.len() == MAX_QUERY_PARAMS {
            return Err("too many query parameters");
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = percent_decode(k).ok_or("malformed percent-encoding in the query")?;
        let v = percent_decode(v).ok_or("malformed percent-encoding in the query")?;
        if out.iter().any(|(n, _)| *n == k) {
            return Err("a query parameter was given twice");
        }
        out.push((k, v));
    }
    Ok(out)
}

/// A response body: fixed bytes of the binary, bytes made for this response, or a bulk
/// payload received from another worker, streamed from where it lies.
#[derive(Debug)]
pub enum Body {
    Static(&'static [u8]),
    Bytes(Vec<u8>),
    Bulk(Bulk),
}

impl Body {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Body::Static(b) => b,
            Body::Bytes(v) => v,
            Body::Bulk(b) => b.bytes(),
        }
    }
}

/// A response before serialisation.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Extra fields (`Set-Cookie`, `Allow`, `Content-Disposition`); names are fixed,
    /// values are built by the ui, never copied from a request.
    pub headers: Vec<(&'static str, String)>,
    /// Adds `Cache-Control: no-store` (every `/api/*` answer).
    pub no_store: bool,
    pub body: Body,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Body) -> Response {
        Response { status, content_type, headers: Vec::new(), no_store: false, body }
    }

    /// A JSON answer.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        match serde_json::to_vec(value) {
            Ok(v) => Response::new(status, "application/json", Body::Bytes(v)),
            Err(_) => Response::error(500, "could not encode the answer"),
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        let body = serde_json::json!({ "error": message }).to_string().into_bytes();
        let mut r = Response::new(status, "application/json", Body::Bytes(body));
        r.no_store = true;
        r
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The status line and header fields of `r` (`keep_alive` false adds `Connection: close`).
pub fn serialize_head(r: &Response, keep_alive: bool) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut h = String::with_capacity(512);
    let _ = write!(h, "HTTP/1.1 {} {}\r\n", r.status, reason_phrase(r.status));
    let _ = write!(h, "Content-Type: {}\r\n", r.content_type);
    let _ = write!(h, "Content-Length: {}\r\n", r.body.bytes().len());
    h.push_str("X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n");
    let _ = write!(h, "Content-Security-Policy: {CSP}\r\n");
    if r.no_store {
        h.push_str("Cache-Control: no-store\r\n");
    }
    for (name, value) in &r.headers {
        // Values are the ui's own; a line break would still split the head, so drop any.
        let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        let _ = write!(h, "{name}: {value}\r\n");
    }
    if !keep_alive {
        h.push_str("Connection: close\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> Head {
        match parse_head(bytes) {
            Parsed::Complete(h) => h,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    fn status(bytes: &[u8]) -> u16 {
        match parse_head(bytes) {
            Parsed::Reject(r) => r.status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn parse_simple_get_yields_path_query_and_keep_alive() {
        let h = head(b"GET /api/trend?tag=t1&from=1 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path, "/api/trend");
        assert_eq!(h.query.as_deref(), Some("tag=t1&from=1"));
        assert!(h.keep_alive);
        assert_eq!(h.content_length, 0);
    }

    #[test]
    fn parse_connection_close_and_http10_end_keep_alive() {
        assert!(!head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn parse_incomplete_head_is_partial() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial);
    }

    #[test]
    fn parse_head_over_8k_is_431() {
        let mut b = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        b.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert_eq!(status(&b), 431, "partial");
        b.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&b), 431, "complete");
    }

    #[test]
    fn parse_65_headers_is_431_and_64_pass() {
        let mut b = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..64 {
            b.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let mut ok = b.clone();
        ok.extend_from_slice(b"\r\n");
        head(&ok);
        b.extend_from_slice(b"X-last: v\r\n\r\n");
        assert_eq!(status(&b), 431);
    }

    #[test]
    fn parse_malformed_request_lines_are_400() {
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"GET http://example.com/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(status(bad), 400, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn parse_body_limits_and_framing() {
        let h = head(b"POST /api/ack HTTP/1.1\r\nContent-Length: 16384\r\n\r\n");
        assert_eq!(h.content_length, MAX_BODY);
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nContent-Length: 16385\r\n\r\n"), 413);
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"), 400);
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n"), 400);
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), 400);
        head(b"POST /api/ack HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
    }

    #[test]
    fn parse_chunked_body_is_411() {
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(status(b"POST /api/ack HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
    }

    #[test]
    fn parse_content_type_recognises_json_only() {
        assert!(head(b"POST / HTTP/1.1\r\nContent-Type: application/json\r\n\r\n").json);
        assert!(head(b"POST / HTTP/1.1\r\nContent-Type: Application/JSON; charset=utf-8\r\n\r\n").json);
        assert!(!head(b"POST / HTTP/1.1\r\nContent-Type: text/plain\r\n\r\n").json);
        assert!(!head(b"POST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n").json);
        assert!(!head(b"POST / HTTP/1.1\r\nContent-Type: application/jsonx\r\n\r\n").json);
        assert!(!head(b"POST / HTTP/1.1\r\n\r\n").json);
    }

    #[test]
    fn session_cookie_is_found_among_others_and_checked() {
        assert_eq!(session_cookie(b"a=b; airlock_session=tok-123; c=d").as_deref(), Some("tok-123"));
        assert_eq!(session_cookie(b"airlock_session=\"q\"").as_deref(), Some("q"));
        assert_eq!(session_cookie(b"xairlock_session=t"), None);
        assert_eq!(session_cookie(b"airlock_session="), None);
        assert_eq!(session_cookie(b"airlock_session=a b"), None);
        assert_eq!(session_cookie(b"airlock_session=a\\b"), None);
        let long = format!("airlock_session={}", "a".repeat(MAX_TOKEN + 1));
        assert_eq!(session_cookie(long.as_bytes()), None);
        let h = head(b"GET / HTTP/1.1\r\nCookie: airlock_session=abc\r\n\r\n");
        assert_eq!(h.session.as_deref(), Some("abc"));
    }

    #[test]
    fn find_head_end_handles_crlf_lf_and_split_arrival() {
        let b = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        assert_eq!(find_head_end(b, 0), Some(b.len() - 4));
        assert_eq!(find_head_end(b, 20), Some(b.len() - 4));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
    }

    #[test]
    fn percent_decode_is_strict() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%2e%2E").as_deref(), Some(".."));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
    }

    #[test]
    fn query_pairs_refuse_duplicates_and_floods() {
        let p = query_pairs("tag=t1&from=5&to=9&_=1").unwrap_or_default();
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], ("tag".to_string(), "t1".to_string()));
        assert!(query_pairs("tag=a&tag=b").is_err());
        assert!(query_pairs("tag=%zz").is_err());
        let many: Vec<String> = (0..=MAX_QUERY_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert!(query_pairs(&many.join("&")).is_err());
    }

    #[test]
    fn every_response_carries_the_security_headers() {
        let r = Response::error(404, "no such route");
        let h = String::from_utf8(serialize_head(&r, true)).unwrap_or_default();
        assert!(h.starts_with("HTTP/1.1 404 Not Found\r\n"));
        for f in [
            "Content-Length: ",
            "X-Content-Type-Options: nosniff\r\n",
            "X-Frame-Options: DENY\r\n",
            "Referrer-Policy: no-referrer\r\n",
            "Content-Security-Policy: default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'\r\n",
        ] {
            assert!(h.contains(f), "{f} missing from {h}");
        }
        assert!(!h.contains("Connection: close"));
        assert!(h.ends_with("\r\n\r\n"));
        let closing = String::from_utf8(serialize_head(&r, false)).unwrap_or_default();
        assert!(closing.contains("Connection: close\r\n"));
    }

    #[test]
    fn header_values_cannot_split_the_head() {
        let r = Response::new(200, "text/plain", Body::Static(b"x")).with_header("Set-Cookie", "a\r\nX-Evil: 1".into());
        let h = String::from_utf8(serialize_head(&r, true)).unwrap_or_default();
        assert!(!h.contains("\r\nX-Evil"));
    }
}
