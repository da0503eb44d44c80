//! The ui's routes: a fixed table of paths (nothing maps a path to a file), the page's
//! assets compiled into the binary, and the `/api/*` handlers that translate JSON to the HMI
//! layers' postcard messages and back.
//!
//! Every `/api/*` route but login validates the session cookie with `auth` first; a request
//! that fails validation goes nowhere else. Handlers reach other workers only through
//! [`Backend`], so routing and every decision here are tested without a supervisor. Never
//! logs bodies, cookies or passwords.

use crate::types as hmi;
use airlock_protocol::wire::CallFailure;
use airlock_protocol::Bulk;
use serde::Deserialize;
use serde_json::json;

use super::http::{self, Body, Head, Method, Response};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Name of the session cookie.
pub const COOKIE: &str = "airlock_session";

/// How long the ui waits for each layer (the event loop waits with it). Where a layer
/// calls another on the request's behalf, the ui waits longer than that layer does, so the
/// client gets the layer's own reason rather than a bare timeout: `logic` validates the
/// session with `auth` (2 s) before an acknowledgement, and also writes to `field` (3 s)
/// for a setpoint.
const AUTH_DEADLINE_MS: u32 = 3000;
const LOGIC_DEADLINE_MS: u32 = 2000;
const ACK_DEADLINE_MS: u32 = 3000;
const SETPOINT_DEADLINE_MS: u32 = 6000;
const HISTORIAN_DEADLINE_MS: u32 = 5000;

/// Trend points asked of the historian.
const TREND_POINTS: u32 = 500;
/// Latest time accepted in a query: 9999-12-31T23:59:59.999Z.
const MAX_MS: i64 = 253_402_300_799_999;
/// Longest range accepted in a query: 400 days.
const MAX_RANGE_MS: i64 = 400 * 24 * 3600 * 1000;
/// Longest tag name accepted (names are ASCII letters, digits, `_` and `-`).
const MAX_TAG: usize = 64;

/// How a call to another worker failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The broker or the callee answered with a failure, told apart by its type.
    Failed(CallFailure),
    /// The ui's own channel failed: the worker must stop.
    Broken(String),
}

/// Calls to the other HMI layers (the worker's channel in production, a script in tests).
pub trait Backend {
    fn call(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        deadline_ms: u32,
    ) -> Result<(Vec<u8>, Option<Bulk>), CallError>;

    /// As [`Backend::call`] for a call whose answer fits in a call region: the worker answers
    /// it in place in a region shared with the callee where one is configured (no supervisor
    /// hop), else through the supervisor.
    fn call_in_place(
        &mut self,
        service: &str,
        method: &str,
        body: Vec<u8>,
        deadline_ms: u32,
    ) -> Result<Vec<u8>, CallError> {
        self.call(service, method, body, deadline_ms).map(|(reply, _)| reply)
    }
}

/// A handled request: the route it matched (for the log) and the answer.
#[derive(Debug)]
pub struct Outcome {
    pub route: &'static str,
    pub response: Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Index,
    AppJs,
    StyleCss,
    Login,
    Logout,
    Session,
    Values,
    Alarms,
    Ack,
    Setpoint,
    Trend,
    Export,
}

/// Every route: its exact path and its one method.
const ROUTES: &[(&str, Method, Route)] = &[
    ("/", Method::Get, Route::Index),
    ("/app.js", Method::Get, Route::AppJs),
    ("/style.css", Method::Get, Route::StyleCss),
    ("/api/login", Method::Post, Route::Login),
    ("/api/logout", Method::Post, Route::Logout),
    ("/api/session", Method::Get, Route::Session),
    ("/api/values", Method::Get, Route::Values),
    ("/api/alarms", Method::Get, Route::Alarms),
    ("/api/ack", Method::Post, Route::Ack),
    ("/api/setpoint", Method::Post, Route::Setpoint),
    ("/api/trend", Method::Get, Route::Trend),
    ("/api/export.csv", Method::Get, Route::Export),
];

/// Answers one complete request.
pub fn handle(head: &Head, body: &[u8], backend: &mut dyn Backend) -> Outcome {
    let Some(&(path, method, route)) = ROUTES.iter().find(|(p, _, _)| *p == head.path) else {
        let mut response = Response::error(404, "no such page");
        response.no_store = head.path.starts_with("/api/");
        return Outcome { route: "unknown", response };
    };
    let api = path.starts_with("/api/");
    let mut response = if head.method != method {
        Response::error(405, "method not allowed").with_header("Allow", method.as_str().to_string())
    } else {
        dispatch(route, head, body, backend)
    };
    if api {
        response.no_store = true;
    }
    Outcome { route: path, response }
}

fn dispatch(route: Route, head: &Head, body: &[u8], backend: &mut dyn Backend) -> Response {
    match route {
        Route::Index => Response::new(200, "text/html; charset=utf-8", Body::Static(INDEX_HTML.as_bytes())),
        Route::AppJs => Response::new(200, "text/javascript; charset=utf-8", Body::Static(APP_JS.as_bytes())),
        Route::StyleCss => Response::new(200, "text/css; charset=utf-8", Body::Static(STYLE_CSS.as_bytes())),
        _ => {
            if head.method == Method::Post {
                if !head.json {
                    return Response::error(415, "the body must be application/json");
                }
                if !same_origin(head) {
                    return Response::error(403, "cross-origin request refused");
                }
            }
            if route == Route::Login {
                return login(body, backend);
            }
            let Some(token) = head.session.clone() else {
                return Response::error(401, "not logged in");
            };
            let session = match call::<hmi::SessionInfo>(
                backend,
                "auth",
                "validate",
                hmi::encode(&hmi::Token(token.clone())),
                AUTH_DEADLINE_MS,
            ) {
                Ok(s) => s,
                Err(Failure::Refused(why)) => return Response::error(401, &why),
                Err(f) => return f.into_response(),
            };
            authorised(route, head, body, token, session, backend)
        }
    }
}

fn authorised(
    route: Route,
    head: &Head,
    body: &[u8],
    token: String,
    session: hmi::SessionInfo,
    backend: &mut dyn Backend,
) -> Response {
    match route {
        Route::Session => Response::json(200, &json!({ "user": session.user })),
        Route::Logout => match backend.call("auth", "logout", hmi::encode(&hmi::Token(token)), AUTH_DEADLINE_MS) {
            Ok(_) => Response::json(200, &json!({ "ok": true }))
                .with_header("Set-Cookie", format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")),
            Err(e) => Failure::from(e).into_response(),
        },
        Route::Values => {
            match call::<Vec<hmi::TagValue>>(backend, "logic", "values", hmi::encode(&()), LOGIC_DEADLINE_MS) {
                Ok(tags) => Response::json(200, &json!({ "tags": tags })),
                Err(f) => f.into_response(),
            }
        }
        Route::Alarms => match call::<Vec<hmi::Alarm>>(backend, "logic", "alarms", hmi::encode(&()), LOGIC_DEADLINE_MS)
        {
            Ok(alarms) => Response::json(200, &json!({ "alarms": alarms })),
            Err(f) => f.into_response(),
        },
        Route::Ack => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct AckBody {
                tag: String,
                kind: hmi::AlarmKind,
            }
            let a: AckBody = match parse_json(body) {
                Ok(a) => a,
                Err(r) => return r,
            };
            if !valid_tag(&a.tag) {
                return Response::error(400, "malformed tag name");
            }
            let ack = hmi::Ack { token, tag: a.tag, kind: a.kind };
            match backend.call("logic", "ack", hmi::encode(&ack), ACK_DEADLINE_MS) {
                Ok(_) => Response::json(200, &json!({ "ok": true })),
                Err(e) => match Failure::from(e) {
                    Failure::Refused(why) => Response::error(409, &why),
                    f => f.into_response(),
                },
            }
        }
        Route::Setpoint => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct SetpointBody {
                tag: String,
                value: f64,
            }
            let s: SetpointBody = match parse_json(body) {
                Ok(s) => s,
                Err(r) => return r,
            };
            if !valid_tag(&s.tag) {
                return Response::error(400, "malformed tag name");
            }
            if !s.value.is_finite() {
                return Response::error(400, "the value must be a finite number");
            }
            let sp = hmi::Setpoint { token, tag: s.tag, value: s.value };
            match call::<hmi::Verdict>(backend, "logic", "setpoint", hmi::encode(&sp), SETPOINT_DEADLINE_MS) {
                Ok(v) => Response::json(200, &json!({ "accepted": v.accepted, "reason": v.reason })),
                Err(Failure::Refused(why)) => Response::error(400, &why),
                Err(f) => f.into_response(),
            }
        }
        Route::Trend => {
            let q = match trend_query(head.query.as_deref().unwrap_or("")) {
                Ok(q) => q,
                Err(why) => return Response::error(400, why),
            };
            let points = backend
                .call_in_place("historian", "trend", hmi::encode(&q), HISTORIAN_DEADLINE_MS)
                .map_err(Failure::from)
                .and_then(|reply| {
                    hmi::decode::<Vec<(i64, f64)>>(&reply)
                        .map_err(|_| Failure::Malformed("a layer answered with a malformed reply"))
                });
            match points {
                Ok(points) => Response::json(200, &json!({ "points": points })),
                Err(Failure::Refused(why)) => Response::error(400, &why),
                Err(f) => f.into_response(),
            }
        }
        Route::Export => {
            let range = match range_query(head.query.as_deref().unwrap_or("")) {
                Ok(r) => r,
                Err(why) => return Response::error(400, why),
            };
            match backend.call("historian", "export", hmi::encode(&range), HISTORIAN_DEADLINE_MS) {
                Ok((_rows, bulk)) => {
                    let body = match bulk {
                        // A payload the channel did not map would arrive as no bytes at all.
                        Some(b) if b.bytes().len() != b.len() => {
                            return Response::error(502, "the export arrived unreadable")
                        }
                        Some(b) => Body::Bulk(b),
                        None => Body::Static(b""),
                    };
                    Response::new(200, "text/csv; charset=utf-8", body)
                        .with_header("Content-Disposition", "attachment; filename=\"history.csv\"".into())
                }
                Err(e) => match Failure::from(e) {
                    Failure::Refused(why) => Response::error(400, &why),
                    f => f.into_response(),
                },
            }
        }
        Route::Index | Route::AppJs | Route::StyleCss | Route::Login => Response::error(500, "misrouted request"),
    }
}

fn login(body: &[u8], backend: &mut dyn Backend) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LoginBody {
        user: String,
        password: String,
    }
    let l: LoginBody = match parse_json(body) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let login = hmi::Login { user: l.user, password: l.password };
    let s = match call::<hmi::SessionInfo>(backend, "auth", "login", hmi::encode(&login), AUTH_DEADLINE_MS) {
        Ok(s) => s,
        Err(Failure::Refused(why)) => return Response::error(401, &why),
        Err(f) => return f.into_response(),
    };
    if !http::is_token(s.token.as_bytes()) {
        return Response::error(502, "auth issued a token that cannot be a cookie");
    }
    Response::json(200, &json!({ "user": s.user, "expires_ms": s.expires_ms }))
        .with_header("Set-Cookie", format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", s.token))
}

/// Why a handler could not get its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The callee itself refused: its reason is for the client (400/401/409 by route).
    Refused(String),
    /// The call did not reach the callee, or it broke down: 502.
    Unavailable(String),
    /// The callee answered something that does not decode: 502.
    Malformed(&'static str),
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Failure {
        match e {
            CallError::Failed(CallFailure::Callee(reason)) => Failure::Refused(reason),
            CallError::Failed(broker) => Failure::Unavailable(broker.to_string()),
            CallError::Broken(reason) => Failure::Unavailable(reason),
        }
    }
}

impl Failure {
    fn into_response(self) -> Response {
        match self {
            Failure::Refused(why) | Failure::Unavailable(why) => Response::error(502, &why),
            Failure::Malformed(what) => Response::error(502, what),
        }
    }
}

/// A call whose reply body is a postcard-encoded `T`.
fn call<T: serde::de::DeserializeOwned>(
    backend: &mut dyn Backend,
    service: &str,
    method: &str,
    body: Vec<u8>,
    deadline_ms: u32,
) -> Result<T, Failure> {
    let (reply, _bulk) = backend.call(service, method, body, deadline_ms).map_err(Failure::from)?;
    hmi::decode::<T>(&reply).map_err(|_| Failure::Malformed("a layer answered with a malformed reply"))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        // serde_json's message names the problem and position, never the body's bytes
        // beyond a field name the client chose; keep only its category to be sure.
        let what = match e.classify() {
            serde_json::error::Category::Data => "the JSON body does not have the expected fields and types",
            _ => "the body is not valid JSON",
        };
        Response::error(400, what)
    })
}

/// Tag names as the plant table allows them: ASCII letters, digits, `_` and `-`.
fn valid_tag(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_TAG && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A POST either comes without `Origin` (not a browser's cross-site request) or from this
/// very origin (`http://HOST` or `https://HOST`, as the browser reached us).
fn same_origin(head: &Head) -> bool {
    let Some(origin) = head.origin.as_deref() else { return true };
    let Some(host) = head.host.as_deref() else { return false };
    origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")).is_some_and(|h| h == host)
}

fn parse_ms(v: &str) -> Option<i64> {
    if v.is_empty() || v.len() > 15 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<i64>().ok().filter(|ms| *ms <= MAX_MS)
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn range_of(pairs: &[(String, String)]) -> Result<hmi::Range, &'static str> {
    let from = param(pairs, "from").ok_or("missing from")?;
    let to = param(pairs, "to").ok_or("missing to")?;
    let from_ms = parse_ms(from).ok_or("from must be milliseconds since the epoch")?;
    let to_ms = parse_ms(to).ok_or("to must be milliseconds since the epoch")?;
    if from_ms >= to_ms {
        return Err("from must be before to");
    }
    if to_ms - from_ms > MAX_RANGE_MS {
        return Err("the range is longer than 400 days");
    }
    Ok(hmi::Range { from_ms, to_ms })
}

/// `tag=NAME&from=MS&to=MS` (other parameters ignored).
fn trend_query(q: &str) -> Result<hmi::TrendQuery, &'static str> {
    let pairs = http::query_pairs(q)?;
    let tag = param(&pairs, "tag").ok_or("missing tag")?;
    if !valid_tag(tag) {
        return Err("malformed tag name");
    }
    let r = range_of(&pairs)?;
    Ok(hmi::TrendQuery { tag: tag.to_string(), from_ms: r.from_ms, to_ms: r.to_ms, max_points: TREND_POINTS })
}

/// `from=MS&to=MS` (other parameters ignored).
fn range_query(q: &str) -> Result<hmi::Range, &'static str> {
    range_of(&http::query_pairs(q)?)
}

#[cfg(test)]
mod tests {
    use super::http::{parse_head, Parsed};
    use super::*;

    /// A scripted backend: answers by `service.method`, records every call.
    #[derive(Default)]
    struct Script {
        calls: Vec<(String, String, Vec<u8>)>,
        answers: Vec<(&'static str, Result<Vec<u8>, CallError>)>,
    }

    impl Script {
        fn answer(mut self, what: &'static str, r: Result<Vec<u8>, CallError>) -> Script {
            self.answers.push((what, r));
            self
        }

        fn valid_session(self) -> Script {
            let s = hmi::SessionInfo { user: "operator".into(), token: "tok".into(), expires_ms: 99 };
            self.answer("auth.validate", Ok(hmi::encode(&s)))
        }

        fn called(&self) -> Vec<String> {
            self.calls.iter().map(|(s, m, _)| format!("{s}.{m}")).collect()
        }
    }

    impl Backend for Script {
        fn call(
            &mut self,
            service: &str,
            method: &str,
            body: Vec<u8>,
            _: u32,
        ) -> Result<(Vec<u8>, Option<Bulk>), CallError> {
            let key = format!("{service}.{method}");
            self.calls.push((service.into(), method.into(), body));
            match self.answers.iter().find(|(k, _)| *k == key) {
                Some((_, r)) => r.clone().map(|b| (b, None)),
                None => Err(CallError::Failed(CallFailure::NoSuchService { service: service.into() })),
            }
        }
    }

    fn req(raw: &str, backend: &mut Script) -> (u16, String, Response) {
        let Parsed::Complete(head) = parse_head(raw.as_bytes()) else { panic!("bad test request {raw:?}") };
        let body = &raw.as_bytes()[head.head_len..];
        let o = handle(&head, body, backend);
        let text = String::from_utf8_lossy(o.response.body.bytes()).into_owned();
        (o.response.status, text, o.response)
    }

    fn get(path: &str, backend: &mut Script) -> (u16, String, Response) {
        req(&format!("GET {path} HTTP/1.1\r\nHost: h\r\nCookie: airlock_session=tok\r\n\r\n"), backend)
    }

    fn post(path: &str, body: &str, backend: &mut Script) -> (u16, String, Response) {
        req(
            &format!(
                "POST {path} HTTP/1.1\r\nHost: h\r\nOrigin: http://h\r\nCookie: airlock_session=tok\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
            backend,
        )
    }

    /// JSON compared as values: key order is serde_json's business.
    fn parsed(text: &str) -> serde_json::Value {
        serde_json::from_str(text).expect("a JSON body")
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn assets_are_served_from_the_binary() {
        let mut b = Script::default();
        let (s, body, r) = get("/", &mut b);
        assert_eq!(s, 200);
        assert!(body.contains("id=\"login\""));
        assert_eq!(r.content_type, "text/html; charset=utf-8");
        assert_eq!(get("/app.js", &mut b).0, 200);
        assert_eq!(get("/style.css", &mut b).0, 200);
        assert!(b.calls.is_empty(), "assets need no session");
        assert!(!r.no_store);
    }

    #[test]
    fn traversal_and_unknown_paths_are_404_without_calls() {
        let mut b = Script::default();
        for p in [
            "/../etc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "//etc/passwd",
            "/index.html",
            "/app.js/",
            "/api/values/",
            "/api/values%00",
            "/API/values",
            "/assets/app.js",
            "/.%2e/",
        ] {
            let (s, _, _) = get(p, &mut b);
            assert_eq!(s, 404, "{p}");
        }
        assert!(b.calls.is_empty());
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let mut b = Script::default();
        let (s, _, r) = req("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", &mut b);
        assert_eq!(s, 405);
        assert_eq!(header(&r, "Allow"), Some("GET"));
        let (s, _, r) = get("/api/login", &mut b);
        assert_eq!(s, 405);
        assert_eq!(header(&r, "Allow"), Some("POST"));
        assert!(r.no_store);
        assert_eq!(req("DELETE /api/values HTTP/1.1\r\n\r\n", &mut b).0, 405);
        assert_eq!(req("HEAD / HTTP/1.1\r\n\r\n", &mut b).0, 405);
        assert!(b.calls.is_empty());
    }

    #[test]
    fn post_without_json_content_type_is_415_without_calls() {
        let mut b = Script::default().valid_session();
        for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
            let raw = format!(
                "POST /api/setpoint HTTP/1.1\r\nCookie: airlock_session=tok\r\nContent-Type: {ct}\r\n\
                 Content-Length: 2\r\n\r\n{{}}"
            );
            assert_eq!(req(&raw, &mut b).0, 415, "{ct}");
        }
        assert_eq!(req("POST /api/login HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", &mut b).0, 415);
        assert!(b.calls.is_empty());
    }

    #[test]
    fn cross_origin_post_is_403() {
        let mut b = Script::default().valid_session();
        let raw = "POST /api/ack HTTP/1.1\r\nHost: h\r\nOrigin: http://evil.example\r\n\
                   Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(req(raw, &mut b).0, 403);
        assert!(b.calls.is_empty());
    }

    #[test]
    fn api_without_cookie_is_401_and_calls_nothing() {
        let mut b = Script::default();
        let (s, body, r) = req("GET /api/values HTTP/1.1\r\n\r\n", &mut b);
        assert_eq!(s, 401);
        assert!(body.contains("\"error\""));
        assert!(r.no_store);
        assert!(b.calls.is_empty());
    }

    #[test]
    fn invalid_session_is_401_with_auths_reason_and_goes_nowhere_else() {
        let mut b = Script::default()
            .answer("auth.validate", Err(CallError::Failed(CallFailure::Callee("session expired".into()))));
        let (s, body, _) = get("/api/values", &mut b);
        assert_eq!(s, 401);
        assert_eq!(parsed(&body), parsed(r#"{"error":"session expired"}"#));
        assert_eq!(b.called(), ["auth.validate"]);
        let (s, _, _) = post("/api/setpoint", r#"{"tag":"sp","value":1}"#, &mut b);
        assert_eq!(s, 401);
        assert_eq!(b.called(), ["auth.validate", "auth.validate"]);
    }

    #[test]
    fn auth_down_is_502() {
        let mut b = Script::default()
            .answer("auth.validate", Err(CallError::Failed(CallFailure::NotRunning { service: "auth".into() })));
        assert_eq!(get("/api/session", &mut b).0, 502);
    }

    #[test]
    fn login_sets_a_strict_http_only_cookie() {
        let s = hmi::SessionInfo { user: "operator".into(), token: "abc-123".into(), expires_ms: 5000 };
        let mut b = Script::default().answer("auth.login", Ok(hmi::encode(&s)));
        let (st, body, r) = post("/api/login", r#"{"user":"operator","password":"pw"}"#, &mut b);
        assert_eq!(st, 200);
        assert_eq!(parsed(&body), parsed(r#"{"expires_ms":5000,"user":"operator"}"#));
        assert_eq!(header(&r, "Set-Cookie"), Some("airlock_session=abc-123; HttpOnly; SameSite=Strict; Path=/"));
        let sent: hmi::Login = hmi::decode(&b.calls[0].2).expect("a Login body");
        assert_eq!(sent, hmi::Login { user: "operator".into(), password: "pw".into() });
    }

    #[test]
    fn login_failure_is_401_with_auths_reason() {
        let mut b = Script::default()
            .answer("auth.login", Err(CallError::Failed(CallFailure::Callee("wrong user or password".into()))));
        let (st, body, r) = post("/api/login", r#"{"user":"operator","password":"x"}"#, &mut b);
        assert_eq!(st, 401);
        assert_eq!(parsed(&body), parsed(r#"{"error":"wrong user or password"}"#));
        assert_eq!(header(&r, "Set-Cookie"), None);
    }

    #[test]
    fn login_with_bad_json_is_400() {
        let mut b = Script::default();
        for body in ["", "{", r#"{"user":"a"}"#, r#"{"user":1,"password":"x"}"#, "[]"] {
            assert_eq!(post("/api/login", body, &mut b).0, 400, "{body}");
        }
        assert!(b.calls.is_empty());
    }

    #[test]
    fn login_token_unfit_for_a_cookie_is_502() {
        let s = hmi::SessionInfo { user: "u".into(), token: "a;b".into(), expires_ms: 1 };
        let mut b = Script::default().answer("auth.login", Ok(hmi::encode(&s)));
        assert_eq!(post("/api/login", r#"{"user":"u","password":"p"}"#, &mut b).0, 502);
    }

    #[test]
    fn logout_calls_auth_and_clears_the_cookie() {
        let mut b = Script::default().valid_session().answer("auth.logout", Ok(hmi::encode(&())));
        let (s, _, r) = post("/api/logout", "{}", &mut b);
        assert_eq!(s, 200);
        assert!(header(&r, "Set-Cookie").is_some_and(|c| c.starts_with("airlock_session=;") && c.contains("Max-Age=0")));
        assert_eq!(b.called(), ["auth.validate", "auth.logout"]);
        let t: hmi::Token = hmi::decode(&b.calls[1].2).expect("a Token");
        assert_eq!(t.0, "tok");
    }

    #[test]
    fn session_names_the_user() {
        let mut b = Script::default().valid_session();
        assert_eq!(parsed(&get("/api/session", &mut b).1), parsed(r#"{"user":"operator"}"#));
    }

    #[test]
    fn values_are_translated_to_json() {
        let v = vec![hmi::TagValue {
            name: "temp".into(),
            description: "Tank temperature".into(),
            value: Some(42.5),
            unit: "C".into(),
            ts_ms: 7,
            writable: false,
            min: None,
            max: None,
            fault: None,
        }];
        let mut b = Script::default().valid_session().answer("logic.values", Ok(hmi::encode(&v)));
        let (s, body, r) = get("/api/values", &mut b);
        assert_eq!(s, 200);
        assert!(r.no_store);
        let j: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(j["tags"][0]["name"], "temp");
        assert_eq!(j["tags"][0]["value"], 42.5);
        for k in ["description", "unit", "ts_ms", "writable", "min", "max", "fault"] {
            assert!(j["tags"][0].get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn logic_down_is_502_with_the_reason() {
        let mut b = Script::default().valid_session();
        let (s, body, _) = get("/api/alarms", &mut b);
        assert_eq!(s, 502);
        assert_eq!(parsed(&body), parsed(r#"{"error":"no such service: logic"}"#));
    }

    #[test]
    fn malformed_reply_is_502() {
        let mut b = Script::default().valid_session().answer("logic.values", Ok(vec![0xff, 0xff, 0xff]));
        assert_eq!(get("/api/values", &mut b).0, 502);
    }

    #[test]
    fn ack_passes_the_token_and_maps_refusal_to_409() {
        let mut b = Script::default().valid_session().answer("logic.ack", Ok(hmi::encode(&())));
        let (s, body, _) = post("/api/ack", r#"{"tag":"temp","kind":"high"}"#, &mut b);
        assert_eq!((s, parsed(&body)), (200, parsed(r#"{"ok":true}"#)));
        let a: hmi::Ack = hmi::decode(&b.calls[1].2).expect("an Ack");
        assert_eq!(a, hmi::Ack { token: "tok".into(), tag: "temp".into(), kind: hmi::AlarmKind::High });
        let mut b = Script::default()
            .valid_session()
            .answer("logic.ack", Err(CallError::Failed(CallFailure::Callee("no such alarm".into()))));
        assert_eq!(post("/api/ack", r#"{"tag":"temp","kind":"low"}"#, &mut b).0, 409);
        for bad in [r#"{"tag":"temp","kind":"middle"}"#, r#"{"tag":"../x","kind":"low"}"#, r#"{"tag":"t"}"#] {
            assert_eq!(post("/api/ack", bad, &mut b).0, 400, "{bad}");
        }
    }

    #[test]
    fn refused_setpoint_is_200_with_the_logic_layers_reason() {
        let v = hmi::Verdict { accepted: false, reason: "interlock: pump running".into() };
        let mut b = Script::default().valid_session().answer("logic.setpoint", Ok(hmi::encode(&v)));
        let (s, body, _) = post("/api/setpoint", r#"{"tag":"sp","value":12.5}"#, &mut b);
        assert_eq!(s, 200);
        assert_eq!(parsed(&body), parsed(r#"{"accepted":false,"reason":"interlock: pump running"}"#));
        let sp: hmi::Setpoint = hmi::decode(&b.calls[1].2).expect("a Setpoint");
        assert_eq!(sp, hmi::Setpoint { token: "tok".into(), tag: "sp".into(), value: 12.5 });
        assert_eq!(post("/api/setpoint", r#"{"tag":"sp","value":"12"}"#, &mut b).0, 400);
        assert_eq!(post("/api/setpoint", r#"{"tag":"sp","value":1e999}"#, &mut b).0, 400);
    }

    #[test]
    fn trend_validates_its_query() {
        let pts: Vec<(i64, f64)> = vec![(1000, 1.5), (2000, 2.5)];
        let mut b = Script::default().valid_session().answer("historian.trend", Ok(hmi::encode(&pts)));
        let (s, body, _) = get("/api/trend?tag=temp&from=1000&to=3000", &mut b);
        assert_eq!((s, parsed(&body)), (200, parsed(r#"{"points":[[1000,1.5],[2000,2.5]]}"#)));
        let q: hmi::TrendQuery = hmi::decode(&b.calls[1].2).expect("a TrendQuery");
        assert_eq!(q, hmi::TrendQuery { tag: "temp".into(), from_ms: 1000, to_ms: 3000, max_points: 500 });
        for bad in [
            "",
            "?tag=temp&from=1000",
            "?tag=temp&from=x&to=3",
            "?tag=temp&from=-5&to=3",
            "?tag=temp&from=1e3&to=3000",
            "?tag=temp&from=3000&to=1000",
            "?tag=temp&from=0&to=999999999999999999",
            "?tag=temp&from=0&to=253402300800000",
            "?tag=%2e%2e&from=1&to=2",
            "?tag=a%zz&from=1&to=2",
            "?tag=a&tag=b&from=1&to=2",
            "?tag=&from=1&to=2",
            "?tag=t&from=0&to=34560000001",
        ] {
            let before = b.calls.len();
            assert_eq!(get(&format!("/api/trend{bad}"), &mut b).0, 400, "{bad}");
            assert_eq!(b.calls.len(), before + 1, "only auth.validate for {bad}");
        }
    }

    #[test]
    fn trend_of_unknown_tag_is_400_with_the_historians_reason() {
        let mut b = Script::default()
            .valid_session()
            .answer("historian.trend", Err(CallError::Failed(CallFailure::Callee("unknown tag nope".into()))));
        let (s, body, _) = get("/api/trend?tag=nope&from=1&to=2", &mut b);
        assert_eq!((s, parsed(&body)), (400, parsed(r#"{"error":"unknown tag nope"}"#)));
    }

    #[test]
    fn export_is_csv_attachment() {
        let mut b = Script::default().valid_session().answer("historian.export", Ok(hmi::encode(&0u64)));
        let (s, _, r) = get("/api/export.csv?from=1&to=2", &mut b);
        assert_eq!(s, 200);
        assert_eq!(r.content_type, "text/csv; charset=utf-8");
        assert_eq!(header(&r, "Content-Disposition"), Some("attachment; filename=\"history.csv\""));
        assert!(r.no_store);
        let range: hmi::Range = hmi::decode(&b.calls[1].2).expect("a Range");
        assert_eq!(range, hmi::Range { from_ms: 1, to_ms: 2 });
        assert_eq!(get("/api/export.csv?from=2&to=1", &mut b).0, 400);
    }

    #[test]
    fn broker_failures_are_unavailable_by_type_whatever_the_callee_says() {
        use CallFailure as F;
        for f in [
            F::NotPermitted { rule: "ui may not call logic.values".into() },
            F::NoSuchService { service: "logic".into() },
            F::NotRunning { service: "logic".into() },
            F::TimedOut { worker: "logic".into(), after_ms: 2000 },
            F::CalleeDied { worker: "historian".into() },
            F::Busy { why: "ui has 8 calls in flight (quota 8)".into() },
            F::Unreachable { worker: "logic".into(), why: "channel closed".into() },
        ] {
            assert!(matches!(Failure::from(CallError::Failed(f.clone())), Failure::Unavailable(_)), "{f}");
        }
        // A callee's own words stay its own, even when they read like the broker's.
        for r in ["no such alarm", "unknown tag x", "not permitted: but by logic", "service auth is not running"] {
            let got = Failure::from(CallError::Failed(F::Callee(r.into())));
            assert_eq!(got, Failure::Refused(r.into()), "{r}");
        }
    }
}
