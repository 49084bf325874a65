//! Fuzzes the PROXY protocol header parser: no input may panic, a header it accepts lies
//! within the input, and every prefix of an accepted input asks for more or fails, never
//! accepts a different header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spice_operator::proxy::proxy_protocol;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((origin, len))) = proxy_protocol::parse(data) {
        assert!(len > 0 && len <= data.len() && len <= proxy_protocol::MAX_HEADER);
        // What a reader that got the bytes in two pieces would see.
        for cut in [len / 2, len.saturating_sub(1)] {
            match proxy_protocol::parse(&data[..cut]) {
                Ok(Some((o, l))) => assert_eq!((o, l), (origin, len), "a prefix parsed as another header"),
                Ok(None) | Err(_) => {}
            }
        }
    }
});
