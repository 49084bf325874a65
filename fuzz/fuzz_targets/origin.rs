//! Fuzzes the `html5.allowedOrigins` check, whose output goes into the console pages'
//! Content-Security-Policy header: no input may panic, and an origin it accepts must be a valid
//! header value (visible ASCII) holding a single source (no space, `;`, `,` or quote to add
//! sources or directives) and must be accepted again unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use spice_operator::proxy::websocket::{frame_ancestors, origin};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(o) = origin(text) {
        assert!(o.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'\''), "{o:?}");
        assert_eq!(origin(&o).as_deref(), Ok(o.as_str()), "not stable: {text:?}");
        let csp = frame_ancestors(&[text.to_string()]);
        assert_eq!(csp, format!("frame-ancestors {o}"));
    }
});
