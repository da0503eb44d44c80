//! The ui's request path: a request head parsed under the ui's limits, then, when complete,
//! routed with its body through every API handler against a backend whose answers (the other
//! layers' postcard bodies, or failures) come from the input too.
#![no_main]

use airlock_hmi::ui::api::{self, Backend, CallError};
use airlock_hmi::ui::http::{self, Parsed};
use airlock_protocol::wire::CallFailure;
use airlock_protocol::Bulk;
use libfuzzer_sys::fuzz_target;

struct Scripted<'a> {
    answers: &'a [u8],
}

impl Backend for Scripted<'_> {
    fn call(&mut self, _: &str, _: &str, _: Vec<u8>, _: u32) -> Result<(Vec<u8>, Option<Bulk>), CallError> {
        let Some((&sel, rest)) = self.answers.split_first() else {
            return Err(CallError::Failed(CallFailure::TimedOut { worker: "logic".into(), after_ms: 2000 }));
        };
        let n = usize::from(sel & 0x3f).min(rest.len());
        let (body, rest) = rest.split_at(n);
        self.answers = rest;
        match sel >> 6 {
            0 => Err(CallError::Failed(CallFailure::Callee(String::from_utf8_lossy(body).into()))),
            1 => Err(CallError::Broken("channel".into())),
            _ => Ok((body.to_vec(), None)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The request, then (after a 0xff 0x00 separator, if any) the backend's answers.
    let split = data.windows(2).position(|w| w == [0xff, 0x00]);
    let (req, answers) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    if let Some(end) = http::find_head_end(req, 0) {
        assert!(end <= req.len());
    }
    if let Parsed::Complete(head) = http::parse_head(req) {
        assert!(head.head_len <= req.len() && head.content_length <= http::MAX_BODY);
        let body = &req[head.head_len..];
        let body = &body[..body.len().min(head.content_length)];
        if let Some(q) = &head.query {
            let _ = http::query_pairs(q);
        }
        let out = api::handle(&head, body, &mut Scripted { answers });
        let _ = http::serialize_head(&out.response, head.keep_alive);
    }
});
