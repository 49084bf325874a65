//! Fuzzes the CONNECT request-head parser and the Basic credential decoder: no input may
//! panic, and an accepted head must describe a usable target.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spice_operator::proxy::head;

fuzz_target!(|data: &[u8]| {
    if let Some(end) = head::head_len(data) {
        if let Ok(req) = head::parse(&data[..end]) {
            assert!(req.port > 0 && !req.host.is_empty());
            if let Some(auth) = &req.proxy_authorization {
                let _ = head::basic_credentials(auth);
            }
        }
    }
    let _ = head::parse(data);
});
