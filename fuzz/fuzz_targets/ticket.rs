//! Fuzzes ticket verification, the token every client sends as its Basic password (and the
//! browser port takes from the URL): no input may panic. Most inputs are signed with the
//! fuzzer's key first, so the decoding behind the signature check is reached too, and a
//! ticket it accepts must not have expired and must survive minting again unchanged.
#![no_main]
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use libfuzzer_sys::fuzz_target;
use spice_operator::proxy::ticket;

const KEY: &[u8] = b"fuzz key";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let keys = [KEY.to_vec()];
    let token = match mode % 3 {
        // As a client sends it: anything.
        0 => String::from_utf8_lossy(rest).into_owned(),
        // Signed, the payload text as given (base64 or not).
        1 => ticket::sign(KEY, &String::from_utf8_lossy(rest)),
        // Signed, the bytes as the JSON behind the base64.
        _ => ticket::sign(KEY, &B64.encode(rest)),
    };
    if let Ok(claims) = ticket::verify(&keys, &token, 0) {
        assert!(claims.expires > 0, "expiry 0 is in the past at time 0");
        assert_eq!(ticket::verify(&keys, &ticket::mint(KEY, &claims), 0).as_ref(), Ok(&claims));
    }
});
