//! Mends known bugs in the spice-html5 client the html5 port serves, so browser consoles do
//! not fail at random.
//!
//! `ticket.js`: spice-html5 (0.3.0, Debian's, and upstream at the time of writing) encrypts the
//! SPICE ticket with RSA-OAEP and turns the result into bytes through `BigInteger.toString(16)`,
//! which drops leading zero bytes. About one ciphertext in 128 to 256 starts with a zero byte; the
//! client then sends 127 bytes shifted left, the server's decryption fails and it answers the link
//! with "Permission denied" even without a password. Every channel of every console rolls that
//! dice, so a few percent of consoles lose their main or display channel. The mend left-pads the
//! hex string to the key length before it is split into bytes; a client that already pads is
//! served unchanged in effect (the loop does nothing).
//!
//! `spice_auto.html` hands the page's `?token=` to the bridge only through a cookie, set by
//! `document.cookie` just before the first WebSocket opens. Chromium stores that cookie
//! asynchronously, and now and then the WebSocket opens before it is stored and goes without
//! it: 401, "Can't connect to websocket" (once in eight runs of `tests/browser.rs` beside
//! another suite; CI's one failed browser test showed the same message). A browser that keeps no
//! cookies for the proxy's origin (blocked by policy, or third-party in a portal's iframe) never
//! sends it, and two consoles opened at once in two tabs can overwrite each other's cookie
//! before the first has opened all its channels (403: another VM's ticket). The mend also puts
//! the token in the WebSocket URL, which every channel reuses and the bridge reads before the
//! cookie.

/// The statement in `ticket.js`'s `rsa_encrypt` that loses the leading zeros.
const LOSSY: &str = "var h = enc.toString(16);";
/// The same statement followed by padding to the modulus length in hex digits.
const PADDED: &str =
    "var h = enc.toString(16); while (h.length < ((rsa.n.bitLength() + 7) >> 3) * 2) h = \"0\" + h; /* spice-operator: keep leading zero bytes */";

/// Where `spice_auto.html` opens the main channel with the URL it built; `token` is the page's
/// `?token=` (or null) in the same function.
const COOKIE_ONLY: &str = "new SpiceHtml5.SpiceMainConn({uri: uri,";
/// The same with the token in the URL's query too.
const TOKEN_IN_URL: &str = "new SpiceHtml5.SpiceMainConn({uri: (token ? uri + (uri.indexOf('?') < 0 ? '?' : '&') + 'token=' + encodeURIComponent(token) : uri) /* spice-operator: not only in a cookie */,";

/// The bytes to serve for the file at `path` (relative to the static directory): `ticket.js`
/// with its RSA output padded, `spice_auto.html` with the token in its WebSocket URL, anything
/// else as read. A file whose code is not as expected (the statement missing, or there twice)
/// is served as read.
pub fn mend(path: &str, bytes: Vec<u8>) -> Vec<u8> {
    // (code that shows it is the file we know, the statement to mend, what replaces it)
    let (context, statement, mended) = match path.rsplit('/').next() {
        Some("ticket.js") => ("function rsa_encrypt", LOSSY, PADDED),
        Some("spice_auto.html") => ("spice_query_var('token'", COOKIE_ONLY, TOKEN_IN_URL),
        _ => return bytes,
    };
    match String::from_utf8(bytes) {
        Ok(text) if text.contains(context) && text.matches(statement).count() == 1 => text.replacen(statement, mended, 1).into_bytes(),
        Ok(text) => text.into_bytes(),
        Err(e) => e.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `rsa_encrypt` as spice-html5 0.3.0 ships it.
    const TICKET_JS: &str = r#"function rsa_encrypt(rsa, str)
{
    var i;
    var ret = [];
    var oaep = RSA_padding_add_PKCS1_OAEP((rsa.n.bitLength()+7)>>3, str);
    var bigint = new BigInteger(ba);
    var enc = rsa.doPublic(bigint);
    var h = enc.toString(16);
    if ((h.length & 1) != 0)
        h = "0" + h;
    for (i = 0; i < h.length; i += 2)
        ret[i / 2] = parseInt(h.substring(i, i + 2), 16);
    return ret;
}
"#;

    #[test]
    fn the_ticket_is_padded_to_the_key_length_before_it_becomes_bytes() {
        let served = String::from_utf8(mend("ticket.js", TICKET_JS.as_bytes().to_vec())).unwrap();
        assert!(served.contains("while (h.length < ((rsa.n.bitLength() + 7) >> 3) * 2) h = \"0\" + h;"), "{served}");
        // Padded before the odd-length fix and the byte loop, which then see the full length.
        assert!(served.find("while (h.length").unwrap() < served.find("if ((h.length & 1)").unwrap());
        assert_eq!(served.lines().count(), TICKET_JS.lines().count(), "one statement changed, nothing else");
        // In a subdirectory too (the page imports it relative to itself).
        assert_eq!(mend("/js/ticket.js", TICKET_JS.as_bytes().to_vec()), served.as_bytes());
    }

    #[test]
    fn other_files_and_unknown_ticket_code_are_served_as_read() {
        assert_eq!(mend("spiceconn.js", TICKET_JS.as_bytes().to_vec()), TICKET_JS.as_bytes());
        let other = "function rsa_encrypt(rsa, str) { return rsa.encryptPadded(str); }";
        assert_eq!(mend("ticket.js", other.as_bytes().to_vec()), other.as_bytes());
        let twice = format!("{TICKET_JS}{LOSSY}");
        assert_eq!(mend("ticket.js", twice.clone().into_bytes()), twice.as_bytes(), "ambiguous: left alone");
        assert_eq!(mend("ticket.js", vec![0xff, 0xfe]), vec![0xff, 0xfe]);
    }

    /// `connect` in spice_auto.html as spice-html5 0.3.0 ships it (abridged).
    const SPICE_AUTO: &str = r#"            function connect(password)
            {
                var token = spice_query_var('token', null);
                if (token) {
                    spice_set_cookie('token', token, 1)
                }
                uri = scheme + host + ":" + port;
                try
                {
                    sc = new SpiceHtml5.SpiceMainConn({uri: uri, screen_id: "spice-screen", dump_id: "debug-div",
                                message_id: "message-div", password: password, onerror: spice_error, onagent: agent_connected });
                }
"#;

    #[test]
    fn the_console_page_puts_the_token_in_the_websocket_url() {
        let served = String::from_utf8(mend("/spice_auto.html", SPICE_AUTO.as_bytes().to_vec())).unwrap();
        assert!(served.contains("SpiceMainConn({uri: (token ? uri + (uri.indexOf('?') < 0 ? '?' : '&') + 'token=' + encodeURIComponent(token) : uri)"), "{served}");
        assert!(served.contains("spice_set_cookie('token', token, 1)"), "the cookie stays, for pages that read it");
        assert_eq!(served.lines().count(), SPICE_AUTO.lines().count(), "one statement changed, nothing else");
        // spice.html (the form without a token) and a page without the token code: as read.
        assert_eq!(mend("spice.html", SPICE_AUTO.as_bytes().to_vec()), SPICE_AUTO.as_bytes());
        let other = SPICE_AUTO.replace("spice_query_var('token', null)", "null");
        assert_eq!(mend("spice_auto.html", other.clone().into_bytes()), other.as_bytes());
    }
}
